#include <gtest/gtest.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstring>
#include <filesystem>

#include "io/isolated.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/limits.hpp"
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

// ---- Reliability: bounded parsing, limits, file types (docs/reliability.md) ---------------------

namespace {

// A .npy v1/v2 file with `header` as its dict (padded like numpy) and `data` after it.
std::string npy_with_header(std::string header, const std::string& data, int major = 1) {
  const size_t fixed = major == 1 ? 10 : 12;
  while ((fixed + header.size() + 1) % 64) header += ' ';
  header += '\n';
  std::string out = std::string("\x93NUMPY", 6) + static_cast<char>(major) + '\0';
  if (major == 1) {
    const uint16_t n = static_cast<uint16_t>(header.size());
    out.append(reinterpret_cast<const char*>(&n), 2);
  } else {
    const uint32_t n = static_cast<uint32_t>(header.size());
    out.append(reinterpret_cast<const char*>(&n), 4);
  }
  return out + header + data;
}

// The InputError message of `fn`, or a test failure when it throws nothing or something else.
template <typename Fn>
std::string input_error(Fn&& fn) {
  try {
    fn();
  } catch (const InputError& e) {
    return e.what();
  }
  ADD_FAILURE() << "no InputError";
  return "";
}

}  // namespace

TEST(Probes, LongFieldsGiveShortErrorsNotACrash) {
  // 30,000 digits overflowed the stack of std::regex; now one short line naming the option.
  const std::string digits(30000, '9');
  std::string message = input_error([&] { make_probes("random:" + digits + ":8:0", 64); });
  EXPECT_NE(message.find("--probes 'random:999"), std::string::npos) << message;
  EXPECT_NE(message.find("N must be a whole number"), std::string::npos) << message;
  EXPECT_LT(message.size(), 200u);
  // A 40 KB descr in a .npy header (the second stack overflow).
  test::TempDir dir;
  test::write_file(dir / "long.npy",
                   npy_with_header("{'descr': '" + std::string(40000, 'x') +
                                       "', 'fortran_order': False, 'shape': (1, 2), }",
                                   std::string(8, '\0'), 2));
  message = input_error([&] { load_tokens(dir / "long.npy"); });
  EXPECT_NE(message.find("long.npy: token dtype 'xxx"), std::string::npos) << message;
  EXPECT_LT(message.size(), 300u);
  // A header past the documented limit is refused before it is parsed.
  test::write_file(dir / "huge.npy",
                   npy_with_header("{'descr': '<i4', 'fortran_order': False, 'shape': (1, 2), " +
                                       std::string(kMaxNpyHeaderBytes, ' ') + "}",
                                   std::string(8, '\0'), 2));
  message = input_error([&] { load_tokens(dir / "huge.npy"); });
  EXPECT_NE(message.find("more than the limit of 65536"), std::string::npos) << message;
}

TEST(Probes, NpyHeaderIsParsedStrictly) {
  test::TempDir dir;
  const std::string six_ints(24, '\0');
  auto accepts = [&](const std::string& header) {
    test::write_file(dir / "a.npy", npy_with_header(header, six_ints));
    const IntArray t = load_tokens(dir / "a.npy");
    EXPECT_EQ(t.shape, (std::vector<size_t>{2, 3})) << header;
  };
  accepts("{'descr': '<i4', 'fortran_order': False, 'shape': (2, 3), }");
  accepts("{\"shape\":(2,3),\"descr\":\"<i4\",\"fortran_order\":False}");
  accepts("{'descr':'<i4','shape':( 2 , 3 ,)}");  // numpy requires fortran_order; we default it
  auto rejects = [&](const std::string& header, const std::string& fragment) {
    test::write_file(dir / "b.npy", npy_with_header(header, six_ints));
    const std::string message = input_error([&] { load_tokens(dir / "b.npy"); });
    EXPECT_NE(message.find(fragment), std::string::npos) << header << " -> " << message;
    EXPECT_EQ(message.rfind(dir / "b.npy", 0), 0u) << message;
  };
  rejects("{'descr': '<i4', 'fortran_order': True, 'shape': (2, 3), }", "Fortran order");
  rejects("{'descr': '<i4', 'fortran_order': False, }", "no shape");
  rejects("{'fortran_order': False, 'shape': (2, 3), }", "no descr");
  rejects("{'descr': '<i4', 'descr': '<i8', 'shape': (2, 3), }", "repeated key 'descr'");
  rejects("{'descr': '<i4', 'shape': (2, 3), 'extra': 1}", "unexpected or repeated key 'extra'");
  rejects("{'descr': [('a', '<i4')], 'shape': (2, 3), }", "not a simple dtype string");
  rejects("{'descr': '<i4', 'shape': (2, 3)", "expected ',' or '}'");
  rejects("{'descr': '<i4', 'shape': (2, 3)} trailing", "text after the closing");
  rejects("{'descr': '<i4', 'shape': (2, -3), }", "bad shape entry '-3'");
  rejects("{'descr': '<i4', 'fortran_order': Maybe, 'shape': (2, 3), }", "not True or False");
  rejects("{'descr: '<i4', 'shape': (2, 3), }", "expected ':'");
}

TEST(Probes, NumbersAreCheckedAgainstTheTokenLimit) {
  // Each was an uncaught std::stoull exception (exit 2, "stoull") or an overflow.
  EXPECT_NE(input_error([] {
              make_probes("random:99999999999999999999:8:0", 64);
            }).find("--probes 'random:99999999999999999999:8:0': N must be"),
            std::string::npos);
  EXPECT_NE(input_error([] {
              make_probes("repeat:2:8:99999999999999999999", 64);
            }).find("TOKEN must be a whole number"),
            std::string::npos);
  EXPECT_NE(input_error([] {
              make_probes("random:65536:65536:0", 64);
            }).find("65536 probes x 65536 positions exceed the limit of 268435456 tokens"),
            std::string::npos);
  EXPECT_NE(input_error([] { make_probes("random:2:8", 64); }).find("expected random:N:T:SEED"),
            std::string::npos);
  EXPECT_NE(input_error([] { make_probes("random:2:8:1:5", 64); }).find("expected random:N:T"),
            std::string::npos);
  EXPECT_NE(input_error([] { make_probes("random:0:8:1", 64); }).find("N must be"),
            std::string::npos);
  EXPECT_NE(input_error([] { make_probes("random:+2:8:1", 64); }).find("N must be"),
            std::string::npos);
  EXPECT_EQ(make_probes("random:2:8:18446744073709551615", 64).shape, (std::vector<size_t>{2, 8}));
  // The limit itself, and overflowing products.
  EXPECT_NO_THROW(check_token_count(1 << 14, 1 << 14, "x"));
  EXPECT_THROW(check_token_count(1 << 14, (1 << 14) + 1, "x"), InputError);
  EXPECT_THROW(check_token_count(uint64_t{1} << 32, uint64_t{1} << 32, "x"), InputError);

  test::TempDir dir;
  // A 23-digit shape entry, and (2^31, 2^31) whose byte count overflowed to the data's 0 bytes.
  test::write_file(dir / "a.npy", npy_with_header("{'descr': '<i8', 'fortran_order': False, "
                                                  "'shape': (12345678901234567890123, 2), }",
                                                  ""));
  EXPECT_NE(input_error([&] {
              load_tokens(dir / "a.npy");
            }).find("shape entry 12345678901234567890123 exceeds the limit"),
            std::string::npos);
  test::write_file(dir / "b.npy", npy_with_header("{'descr': '<i8', 'fortran_order': False, "
                                                  "'shape': (2147483648, 2147483648), }",
                                                  ""));
  EXPECT_NE(input_error([&] { load_tokens(dir / "b.npy"); }).find("exceeds the limit"),
            std::string::npos);
  test::write_file(dir / "c.npy", npy_with_header("{'descr': '<i4', 'fortran_order': False, "
                                                  "'shape': (16384, 16385), }",
                                                  ""));
  EXPECT_NE(input_error([&] {
              load_tokens(dir / "c.npy");
            }).find("token array [16384, 16385] exceeds the limit of 268435456 tokens"),
            std::string::npos);
}

TEST(Probes, TokenFilesMustBeRegularFiles) {
  test::TempDir dir;
  ASSERT_EQ(::mkfifo((dir / "fifo.npy").c_str(), 0600), 0);
  ASSERT_EQ(::mkfifo((dir / "fifo.h5").c_str(), 0600), 0);
  std::filesystem::create_symlink("/dev/zero", dir / "zero.npy");
  std::filesystem::create_directory(dir / "folder.npy");
  // In a child with a deadline: a FIFO used to block open() forever, /dev/zero to grow memory.
  for (const auto& [name, kind] :
       {std::pair{"fifo.npy", "a FIFO"}, std::pair{"fifo.h5", "a FIFO"},
        std::pair{"zero.npy", "a character device"}, std::pair{"folder.npy", "a folder"}}) {
    const std::string path = dir / name;
    const std::string answer = run_isolated(
                                   [&]() -> std::string {
                                     try {
                                       load_tokens(path);
                                     } catch (const InputError& e) {
                                       return e.what();
                                     }
                                     return "accepted";
                                   },
                                   20)
                                   .answer;
    EXPECT_EQ(answer, path + ": token file is " + kind + ", not a regular file");
  }
}
