#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>

#include "sinkscope/error.hpp"
#include "sinkscope/probes.hpp"
#include "test_util.hpp"

using namespace sinkscope;

TEST(Sha256, StandardVectors) {
  EXPECT_EQ(sha256_hex("", 0), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc", 3),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  const char* two =
      "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";  // 56 bytes: two padding blocks
  EXPECT_EQ(sha256_hex(two, std::strlen(two)),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  std::string million(1000000, 'a');
  EXPECT_EQ(sha256_hex(million.data(), million.size()),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(Probes, NpyRoundTripInt32) {
  test::TempDir dir;
  IntArray t = test::probe_matrix(3, 5, 0, 50, 7, 1);
  save_npy_int32(dir / "t.npy", t);
  IntArray u = load_tokens(dir / "t.npy");
  EXPECT_EQ(u.shape, t.shape);
  EXPECT_EQ(u.data, t.data);
}

TEST(Probes, NpyInt64AndRejects) {
  test::TempDir dir;
  auto npy = [&](const std::string& descr, const std::string& shape, size_t width, size_t count) {
    std::string h = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + shape + ", }";
    while ((10 + h.size() + 1) % 64) h += ' ';
    h += '\n';
    std::string out = std::string("\x93NUMPY\x01\x00", 8);
    const uint16_t n = static_cast<uint16_t>(h.size());
    out.append(reinterpret_cast<const char*>(&n), 2);
    out += h;
    std::string data(width * count, '\0');
    for (size_t i = 0; i < count; ++i) data[i * width] = static_cast<char>(i);
    return out + data;
  };
  test::write_file(dir / "a.npy", npy("<i8", "(2, 3)", 8, 6));
  IntArray a = load_tokens(dir / "a.npy");
  EXPECT_EQ(a.data[5], 5);
  auto reject = [&](const std::string& bytes, const std::string& fragment) {
    test::write_file(dir / "b.npy", bytes);
    try {
      load_tokens(dir / "b.npy");
      ADD_FAILURE() << "accepted";
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("b.npy"), std::string::npos);
    }
  };
  reject(npy("<f4", "(2, 3)", 4, 6), "not int32 or int64");
  reject(npy("<i4", "(6,)", 4, 6), "2-D");
  reject(npy("<i4", "(0, 3)", 4, 0), "empty");
  reject(npy("<i4", "(2, 3)", 4, 5), "bytes");
  reject("hello", "bad magic");
  EXPECT_THROW(load_tokens(dir / "missing.npy"), InputError);
  EXPECT_THROW(load_tokens(dir / "x.txt"), InputError);
}

TEST(Probes, GeneratedAndChecked) {
  IntArray r = make_probes("random:4:9:3", 20);
  EXPECT_EQ(r.shape, (std::vector<size_t>{4, 9}));
  EXPECT_EQ(make_probes("random:4:9:3", 20).data, r.data);  // seeded
  for (int v : r.data) EXPECT_TRUE(v >= 0 && v < 20);
  IntArray rep = make_probes("repeat:2:3:5", 20);
  for (int v : rep.data) EXPECT_EQ(v, 5);
  EXPECT_THROW(make_probes("repeat:2:3:25", 20), InputError);
  EXPECT_THROW(make_probes("zeros:1:2:3", 20), InputError);
  IntArray b = prepend_bos(rep, 9);
  EXPECT_EQ(b.shape[1], 4u);
  EXPECT_EQ(b.at(1, 0), 9);
  EXPECT_EQ(b.at(1, 1), 5);
  IntArray bad = rep;
  bad.at(1, 2) = 20;
  try {
    check_token_ids(bad, 20, "probes.npy");
    FAIL();
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("probes.npy: token id 20 at (row 1, column 2)"),
              std::string::npos)
        << e.what();
  }
}

// Contract 1.2 probe hygiene.
TEST(Probes, RandomProbesAvoidSpecialIds) {
  const IntArray all = make_probes("random:50:40:3", 20);
  const IntArray some = make_probes("random:50:40:3", 20, {1, 0, 19, 1, 40});
  // With nothing excluded the draws are 1.1's; with exclusions every other id still occurs.
  EXPECT_EQ(make_probes("random:50:40:3", 20, {}).data, all.data);
  std::vector<int> seen(20, 0);
  for (int v : some.data) ++seen[static_cast<size_t>(v)];
  EXPECT_EQ(seen[0], 0);
  EXPECT_EQ(seen[1], 0);
  EXPECT_EQ(seen[19], 0);
  for (int id = 2; id < 19; ++id) EXPECT_GT(seen[static_cast<size_t>(id)], 0) << id;
  EXPECT_GT(std::count(all.data.begin(), all.data.end(), 1), 0);
  EXPECT_THROW(make_probes("random:1:2:3", 2, {0, 1}), InputError);
}

TEST(Probes, SpecialTokenIdsFromBothConfigFiles) {
  test::TempDir dir;
  test::write_file(
      dir / "config.json",
      R"({"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": null})");
  EXPECT_EQ(special_token_ids(dir.path()), (std::vector<int32_t>{151643, 151645}));
  test::write_file(dir / "generation_config.json", R"({"pad_token_id": 0, "eos_token_id": 2})");
  EXPECT_EQ(special_token_ids(dir.path()), (std::vector<int32_t>{0, 2, 151643, 151645}));
  test::write_file(dir / "generation_config.json", "{not json");
  EXPECT_THROW(special_token_ids(dir.path()), InputError);
}

TEST(Probes, PrependBosRefusesADoubledBos) {
  IntArray t({2, 3}, "probe,position");
  t.data = {4, 5, 5, 8, 5, 6};
  EXPECT_NO_THROW(prepend_bos(t, 5));  // 5 inside the probes is not a doubled BOS
  t.at(0, 0) = 5;
  try {
    prepend_bos(t, 5);
    FAIL();
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("probe 0 already starts with token 5"), std::string::npos)
        << e.what();
  }
}
