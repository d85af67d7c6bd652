// The reader's accept and reject cases. Bad files are generated here, not stored in the repo.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <tuple>

#include "cpu/uninit_allocator.hpp"
#include "io/isolated.hpp"
#include "io/json_bounded.hpp"
#include "sinkscope/checkpoint.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/family.hpp"
#include "sinkscope/limits.hpp"
#include "sinkscope/probes.hpp"
#include "sinkscope/synth.hpp"
#include "test_util.hpp"

using namespace sinkscope;
using sinkscope::test::TempDir;

namespace {

std::vector<TensorInfo> parse(const std::string& header, uint64_t data_len) {
  return parse_safetensors_header(header.data(), header.size(), data_len, "f.safetensors");
}

void expect_reject(const std::string& header, uint64_t data_len, const std::string& fragment) {
  try {
    parse(header, data_len);
    FAIL() << "accepted " << header;
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
    EXPECT_EQ(std::string(e.what()).rfind("f.safetensors", 0), 0u);
  }
}

std::string expect_open_error(const std::string& dir) {
  try {
    Checkpoint ck = Checkpoint::open(dir);
    validate_checkpoint(ck);
  } catch (const InputError& e) {
    return e.what();
  }
  ADD_FAILURE() << "opened " << dir;
  return "";
}

}  // namespace

TEST(SafetensorsHeader, AcceptsValid) {
  auto t = parse(
      R"(  {"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]},
                  "a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}})",
      12);
  ASSERT_EQ(t.size(), 2u);
  const auto& a = t[0].name == "a" ? t[0] : t[1];
  EXPECT_EQ(a.dtype, DType::BF16);
  EXPECT_EQ(a.end, 4u);
  auto other = parse(R"({"x":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})", 8);
  EXPECT_EQ(other[0].dtype,
            DType::Other);  // a valid file, even if sinkscope cannot compute with it
  EXPECT_EQ(parse(R"({"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]}})", 4)[0].shape.size(),
            0u);
}

TEST(SafetensorsHeader, RejectsBadHeaders) {
  expect_reject("{not json", 0, "not valid JSON");
  expect_reject("[1,2]", 0, "not a JSON object");
  expect_reject(R"({"a":{"dtype":"F99","shape":[1],"data_offsets":[0,4]}})", 4, "unknown dtype");
  expect_reject(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", 4,
                "does not match shape");
  expect_reject(
      R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}})",
      6, "overlaps");
  expect_reject(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8, "gap");
  expect_reject(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 8,
                "data section has 8");
  expect_reject(
      R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
      8, "twice");
  expect_reject(R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4, "negative");
  expect_reject(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296,4],"data_offsets":[0,4]}})",
                4, "overflows");
  expect_reject(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}})", 8, "end before");
  expect_reject(R"({"__metadata__":{"k":3}})", 0, "not a string");
  expect_reject(R"({"a":{"dtype":"F32","shape":[1]}})", 0, "data_offsets");
}

TEST(SafetensorsIndex, ParsesAndRejects) {
  auto m = parse_safetensors_index(
      R"({"metadata":{},"weight_map":{"a":"s1.safetensors","b":"s2.safetensors"}})", "i.json");
  EXPECT_EQ(m.size(), 2u);
  EXPECT_THROW(parse_safetensors_index(R"({"weight_map":{"a":"s1","a":"s2"}})", "i.json"),
               InputError);
  EXPECT_THROW(parse_safetensors_index(R"({"weight_map":{"a":"../x"}})", "i.json"), InputError);
  EXPECT_THROW(parse_safetensors_index(R"({"other":1})", "i.json"), InputError);
}

TEST(Conversion, Bf16AndF16) {
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.5f)), 1.5f);
  EXPECT_EQ(f32_to_bf16(1.0f + 1.0f / 512), f32_to_bf16(1.0f));  // ties round to even
  const uint16_t h[4] = {0x3c00, 0xc000, 0x0001, 0x7bff};        // 1, -2, smallest subnormal, 65504
  float out[4];
  convert_to_f32(DType::F16, h, 4, out);
  EXPECT_EQ(out[0], 1.f);
  EXPECT_EQ(out[1], -2.f);
  EXPECT_FLOAT_EQ(out[2], 5.9604645e-8f);
  EXPECT_EQ(out[3], 65504.f);
}

class CheckpointFiles : public ::testing::Test {
 protected:
  void SetUp() override { synthesize(test::tiny_config(), dir.path(), false, 7); }

  // Every tensor of the checkpoint as fp32, ready to be written again (possibly altered).
  struct Contents {
    std::vector<std::vector<float>> data;  // owns the values the TensorToWrite entries point at
    std::vector<TensorToWrite> tensors;
  };
  static Contents read_all(const Checkpoint& ck) {
    Contents c;
    c.data.reserve(ck.tensors().size());
    for (const auto& t : ck.tensors()) {
      int64_t n = 1;
      for (auto d : t.shape) n *= d;
      c.data.emplace_back(static_cast<size_t>(n));
      ck.read_rows(t.name, 0, t.shape.size() <= 1 ? n : n / t.shape.back(), c.data.back().data());
      c.tensors.push_back({t.name, DType::BF16, t.shape, c.data.back().data()});
    }
    return c;
  }

  TempDir dir;
};

TEST_F(CheckpointFiles, OpensValidatesAndReadsSlices) {
  Checkpoint ck = Checkpoint::open(dir.path());
  validate_checkpoint(ck);
  const ModelConfig& c = ck.config();
  std::vector<float> all(static_cast<size_t>(c.hidden_size * c.num_heads * c.head_dim));
  ck.read_rows("model.layers.0.self_attn.o_proj.weight", 0, c.hidden_size, all.data());
  std::vector<float> cols(static_cast<size_t>(c.hidden_size * c.head_dim));
  ck.read_cols("model.layers.0.self_attn.o_proj.weight", c.head_dim, 2 * c.head_dim, cols.data());
  const int64_t width = c.num_heads * c.head_dim;
  for (int64_t r = 0; r < c.hidden_size; ++r)
    for (int64_t j = 0; j < c.head_dim; ++j)
      ASSERT_EQ(cols[r * c.head_dim + j], all[r * width + c.head_dim + j]);
  EXPECT_GT(ck.weight_bytes_read(), 0u);
}

TEST_F(CheckpointFiles, RejectsTruncatedFile) {
  const std::string path = dir / "model.safetensors";
  const std::string bytes = test::read_file(path);
  test::write_file(path, bytes.substr(0, bytes.size() - 10));
  const std::string msg = expect_open_error(dir.path());
  EXPECT_NE(msg.find("model.safetensors"), std::string::npos) << msg;
}

TEST_F(CheckpointFiles, RejectsHugeAndPastEndHeaderLength) {
  const std::string path = dir / "model.safetensors";
  std::string bytes = test::read_file(path);
  uint64_t n = 200ull << 20;
  std::memcpy(bytes.data(), &n, 8);
  test::write_file(path, bytes);
  EXPECT_NE(expect_open_error(dir.path()).find("exceeds the limit of 104857600 bytes"),
            std::string::npos);
  n = bytes.size();
  std::memcpy(bytes.data(), &n, 8);
  test::write_file(path, bytes);
  EXPECT_NE(expect_open_error(dir.path()).find("past the end"), std::string::npos);
  test::write_file(path, "abc");
  EXPECT_NE(expect_open_error(dir.path()).find("truncated"), std::string::npos);
}

TEST_F(CheckpointFiles, RejectsWrongShapeAndMissingTensor) {
  // Rewrite the file with one tensor of the wrong shape, then with one tensor missing.
  const Contents all = read_all(Checkpoint::open(dir.path()));
  const std::vector<TensorToWrite>& tw = all.tensors;
  auto wrong = tw;
  for (auto& t : wrong)
    if (t.name == "model.layers.1.self_attn.k_proj.weight") t.shape = {t.shape[1], t.shape[0]};
  write_safetensors(dir / "model.safetensors", wrong);
  std::string msg = expect_open_error(dir.path());
  EXPECT_NE(msg.find("model.layers.1.self_attn.k_proj.weight"), std::string::npos) << msg;
  EXPECT_NE(msg.find("has shape"), std::string::npos) << msg;
  auto missing = tw;
  missing.erase(std::remove_if(missing.begin(), missing.end(),
                               [](const TensorToWrite& t) {
                                 return t.name == "model.layers.0.mlp.experts.3.down_proj.weight";
                               }),
                missing.end());
  write_safetensors(dir / "model.safetensors", missing);
  msg = expect_open_error(dir.path());
  EXPECT_NE(msg.find("experts.3.down_proj.weight' is missing"), std::string::npos) << msg;
}

TEST_F(CheckpointFiles, RejectsNonFiniteWeight) {
  Contents all = read_all(Checkpoint::open(dir.path()));
  for (size_t i = 0; i < all.tensors.size(); ++i)
    if (all.tensors[i].name == "model.layers.0.self_attn.v_proj.weight")
      all.data[i][5] = std::nanf("");
  write_safetensors(dir / "model.safetensors", all.tensors);
  Checkpoint bad = Checkpoint::open(dir.path());
  std::vector<float> out(static_cast<size_t>(bad.config().num_kv_heads * bad.config().head_dim *
                                             bad.config().hidden_size));
  try {
    bad.read_rows("model.layers.0.self_attn.v_proj.weight", 0,
                  bad.config().num_kv_heads * bad.config().head_dim, out.data());
    FAIL();
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("non-finite"), std::string::npos);
  }
}

TEST_F(CheckpointFiles, ShardedIndex) {
  // Split the single file into two shards with an index.
  const Contents all = read_all(Checkpoint::open(dir.path()));
  std::vector<TensorToWrite> a, b;
  std::string map;
  for (size_t i = 0; i < all.tensors.size(); ++i) {
    (i % 2 ? a : b).push_back(all.tensors[i]);
    map += std::string(map.empty() ? "" : ",") + "\"" + all.tensors[i].name + "\":\"" +
           (i % 2 ? "s1.safetensors" : "s2.safetensors") + "\"";
  }
  std::filesystem::remove(dir / "model.safetensors");
  write_safetensors(dir / "s1.safetensors", a);
  write_safetensors(dir / "s2.safetensors", b);
  test::write_file(dir / "model.safetensors.index.json", "{\"weight_map\":{" + map + "}}");
  Checkpoint sharded = Checkpoint::open(dir.path());
  validate_checkpoint(sharded);
  EXPECT_EQ(sharded.files().size(), 2u);
  // An index naming a shard that does not exist.
  test::write_file(dir / "model.safetensors.index.json",
                   "{\"weight_map\":{" + map + ",\"extra\":\"s3.safetensors\"}}");
  EXPECT_NE(expect_open_error(dir.path()).find("does not exist"), std::string::npos);
}

// ---- Reliability: nesting, sizes and file types of untrusted checkpoint files -------------------

TEST(SafetensorsHeader, NestingIsBoundedAtOnce) {
  // 100 MiB of '[' (the largest header allowed) took 7.2 GB and 36 s; now the parse stops at
  // the 65th level.
  const std::string brackets(kMaxSafetensorsHeaderBytes, '[');
  const auto start = std::chrono::steady_clock::now();
  expect_reject(brackets, 0, "safetensors header: JSON nested more than 64 levels deep");
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(seconds, 2.0);
  // Exactly 64 levels are parsed (and then refused for what they are), 65 are not.
  const auto nested = [](int levels) {
    return R"({"__metadata__":)" + std::string(levels - 1, '[') + std::string(levels - 1, ']') +
           "}";
  };
  expect_reject(nested(64), 0, "__metadata__ is not an object");
  expect_reject(nested(65), 0, "nested more than 64 levels deep");
}

TEST(SafetensorsHeader, RejectsDimensionsBeyondInt64) {
  // A zero-sized tensor passed the byte count whatever its other dimensions ([0, -1] in inspect).
  expect_reject(R"({"a":{"dtype":"F32","shape":[0,18446744073709551615],"data_offsets":[0,0]}})", 0,
                "tensor 'a': shape entry 18446744073709551615 does not fit int64");
  expect_reject(R"({"a":{"dtype":"F32","shape":[0,9223372036854775808],"data_offsets":[0,0]}})", 0,
                "does not fit int64");
  EXPECT_EQ(
      parse(R"({"a":{"dtype":"F32","shape":[0,9223372036854775807],"data_offsets":[0,0]}})", 0)[0]
          .shape[1],
      std::numeric_limits<int64_t>::max());
}

TEST(SafetensorsHeader, QuotesLongNamesShortly) {
  const std::string name(100000, 'n');
  try {
    parse(R"({")" + name + R"(":{"dtype":"F99","shape":[1],"data_offsets":[0,4]}})", 4);
    FAIL();
  } catch (const InputError& e) {
    EXPECT_LT(std::string(e.what()).size(), 400u);
    EXPECT_NE(std::string(e.what()).find("(100000 characters)"), std::string::npos);
  }
}

TEST(SafetensorsIndex, DuplicatesCountOnlyInsideWeightMap) {
  // `metadata` may hold a key equal to a tensor name ("tensor named twice" before).
  const auto m = parse_safetensors_index(
      R"({"metadata":{"a":1,"total_size":8},"weight_map":{"a":"s1.safetensors"}})", "i.json");
  ASSERT_EQ(m.size(), 1u);
  EXPECT_EQ(m[0].first, "a");
  const auto error = [](const std::string& text) -> std::string {
    try {
      parse_safetensors_index(text, "i.json");
    } catch (const InputError& e) {
      return e.what();
    }
    return "accepted";
  };
  EXPECT_EQ(error(R"({"metadata":{"a":1},"weight_map":{"a":"s1","a":"s2"}})"),
            "i.json: weight_map names tensor 'a' twice");
  EXPECT_EQ(error(R"({"weight_map":{"a":"s1"},"weight_map":{"b":"s2"}})"),
            "i.json: key 'weight_map' appears twice");
  EXPECT_EQ(error(R"({"metadata":{"x":{"a":1,"a":2}},"weight_map":{"a":"s1"}})"), "accepted");
  EXPECT_EQ(error(R"({"weight_map":)" + std::string(100, '[')),
            "i.json: JSON nested more than 64 levels deep");
}

TEST(JsonBounded, DepthLimitAndMessages) {
  EXPECT_EQ(parse_json_bounded("[[1]]", "x", 2), nlohmann::json::parse("[[1]]"));
  EXPECT_THROW(parse_json_bounded("[[[1]]]", "x", 2), InputError);
  EXPECT_THROW(parse_json_bounded(R"({"a":{"b":{}}})", "x", 2), InputError);
  try {
    parse_json_bounded("\"" + std::string(1000000, 'q'), "x.json", 64);
    FAIL();
  } catch (const InputError& e) {
    // nlohmann quotes the unterminated string; the message keeps 200 characters of it.
    EXPECT_EQ(std::string(e.what()).rfind("x.json: not valid JSON (", 0), 0u) << e.what();
    EXPECT_LT(std::string(e.what()).size(), 400u);
  }
}

namespace {

// The InputError of Checkpoint::open, found in a child process with a deadline: reading a FIFO
// used to block forever and /dev/zero to grow memory without end.
std::string open_error_isolated(const std::string& dir) {
  return run_isolated(
             [&]() -> std::string {
               try {
                 Checkpoint::open(dir);
               } catch (const InputError& e) {
                 return e.what();
               }
               return "opened";
             },
             20)
      .answer;
}

}  // namespace

TEST_F(CheckpointFiles, RefusesFifosDevicesAndHugeSmallFiles) {
  namespace fs = std::filesystem;
  const std::string single = dir / "model.safetensors";
  const std::string config = dir / "config.json";
  const std::string index = dir / "model.safetensors.index.json";
  fs::rename(single, dir / "weights");
  ASSERT_EQ(::mkfifo(single.c_str(), 0600), 0);
  EXPECT_EQ(open_error_isolated(dir.path()),
            single + ": safetensors file is a FIFO, not a regular file");
  fs::remove(single);
  fs::rename(dir / "weights", single);

  ASSERT_EQ(::mkfifo(index.c_str(), 0600), 0);
  EXPECT_EQ(open_error_isolated(dir.path()),
            index + ": safetensors index is a FIFO, not a regular file");
  fs::remove(index);
  fs::create_symlink("/dev/zero", index);
  EXPECT_EQ(open_error_isolated(dir.path()),
            index + ": safetensors index is a character device, not a regular file");
  fs::remove(index);
  // Sparse: the size is refused before a byte is read.
  test::write_file(index, "{}");
  fs::resize_file(index, kMaxIndexBytes + 1);
  EXPECT_EQ(open_error_isolated(dir.path()),
            index + ": safetensors index has " + std::to_string(kMaxIndexBytes + 1) +
                " bytes, more than the limit of " + std::to_string(kMaxIndexBytes));
  fs::remove(index);

  const std::string saved = test::read_file(config);
  fs::remove(config);
  ASSERT_EQ(::mkfifo(config.c_str(), 0600), 0);
  EXPECT_EQ(open_error_isolated(dir.path()),
            config + ": config file is a FIFO, not a regular file");
  fs::remove(config);
  fs::create_symlink("/dev/zero", config);
  EXPECT_EQ(open_error_isolated(dir.path()),
            config + ": config file is a character device, not a regular file");
  fs::remove(config);
  test::write_file(config, saved + std::string(kMaxConfigBytes, ' '));
  EXPECT_NE(open_error_isolated(dir.path()).find("config file has"), std::string::npos);
  test::write_file(config, std::string(100, '[') + std::string(100, ']'));
  EXPECT_EQ(open_error_isolated(dir.path()), config + ": JSON nested more than 64 levels deep");
  test::write_file(config, saved);
  EXPECT_EQ(open_error_isolated(dir.path()), "opened");
}

// ---- loading at disk speed (issue 16)

namespace {
// The serial writer of sinkscope 1.x (std::ofstream, one value at a time): the parallel chunked
// writer must produce the same bytes.
std::string reference_safetensors_bytes(const std::vector<TensorToWrite>& tensors,
                                        const std::string& header_text) {
  std::string out(8, '\0');
  const uint64_t len = header_text.size();
  std::memcpy(out.data(), &len, 8);
  out += header_text;
  for (const auto& t : tensors) {
    uint64_t n = 1;
    for (auto d : t.shape) n *= static_cast<uint64_t>(d);
    if (t.dtype == DType::F32) {
      out.append(reinterpret_cast<const char*>(t.data), n * 4);
    } else {
      for (uint64_t i = 0; i < n; ++i) {
        const uint16_t h = f32_to_bf16(t.data[i]);
        out.append(reinterpret_cast<const char*>(&h), 2);
      }
    }
  }
  return out;
}

std::vector<uint16_t> random_bits16(size_t n, uint32_t seed) {
  std::vector<uint16_t> v(n);
  uint32_t x = seed;
  for (auto& b : v) {
    x = x * 1664525u + 1013904223u;
    b = static_cast<uint16_t>(x >> 16);
  }
  return v;
}
}  // namespace

TEST(Conversion, ParallelEqualsSerialBitForBit) {
  const size_t n = (size_t{1} << 20) + 12345;  // several chunks and a ragged end
  const auto bits = random_bits16(2 * n, 11);  // every bit pattern class: NaN, inf, subnormal
  for (DType t : {DType::BF16, DType::F16, DType::F32}) {
    const size_t count = t == DType::F32 ? n : 2 * n - 7;
    std::vector<float> serial(count), parallel(count);
    convert_to_f32(t, bits.data(), count, serial.data());
    for (int threads : {2, 3, 8}) {
      std::fill(parallel.begin(), parallel.end(), 0.f);
      convert_to_f32_parallel(t, bits.data(), count, parallel.data(), threads);
      ASSERT_EQ(std::memcmp(serial.data(), parallel.data(), count * 4), 0)
          << dtype_name(t) << " threads " << threads;
    }
  }
}

TEST(Conversion, FirstNonFiniteReadsTheExponentBits) {
  const uint16_t bf[4] = {0x3f80, 0x7f7f, 0xff80, 0x7fc0};  // 1, max finite, -inf, NaN
  EXPECT_EQ(first_non_finite(DType::BF16, bf, 2), 2u);
  EXPECT_EQ(first_non_finite(DType::BF16, bf, 4), 2u);
  const uint16_t h[3] = {0x3c00, 0x7bff, 0x7c00};  // 1, 65504, inf
  EXPECT_EQ(first_non_finite(DType::F16, h, 3), 2u);
  const float f[3] = {1.f, 3e38f, std::nanf("")};
  EXPECT_EQ(first_non_finite(DType::F32, f, 3), 2u);
}

TEST(Writer, ParallelChunkedWriterMatchesTheSerialBytes) {
  TempDir dir;
  // Two tensors larger than the parallel threshold and than no buffer boundary in particular,
  // an fp32 tensor at an odd bf16 offset, and rounding ties.
  std::vector<float> a(700 * 513), b(5), c(300001);
  uint32_t x = 5;
  for (auto* v : {&a, &b, &c})
    for (auto& f : *v) {
      x = x * 1664525u + 1013904223u;
      f = (static_cast<float>(x >> 8) / 16777216.f - 0.5f) * 3.f;
    }
  a[0] = 1.0f + 1.0f / 256;  // a tie
  std::vector<TensorToWrite> tw = {{"a", DType::BF16, {700, 513}, a.data()},
                                   {"b", DType::F32, {5}, b.data()},
                                   {"c", DType::BF16, {300001}, c.data()}};
  write_safetensors(dir / "x.safetensors", tw);
  const std::string got = test::read_file(dir / "x.safetensors");
  uint64_t header_len = 0;
  std::memcpy(&header_len, got.data(), 8);
  const std::string expected = reference_safetensors_bytes(tw, got.substr(8, header_len));
  ASSERT_EQ(got.size(), expected.size());
  EXPECT_TRUE(got == expected);
}

class BigTensorFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    synthesize(test::tiny_config(), dir.path(), false, 7);
    // Replace the weights with tensors large enough for the parallel paths.
    big.resize(700 * 513);
    vec.resize(1000);
    uint32_t x = 3;
    for (auto& f : big) {
      x = x * 1664525u + 1013904223u;
      f = static_cast<float>(x >> 8) / 16777216.f - 0.5f;
    }
    for (size_t i = 0; i < vec.size(); ++i) vec[i] = static_cast<float>(i) * 0.25f;
    write_safetensors(dir / "model.safetensors", {{"big", DType::BF16, {700, 513}, big.data()},
                                                  {"vec", DType::F32, {1000}, vec.data()}});
  }
  TempDir dir;
  std::vector<float> big, vec;
};

TEST_F(BigTensorFiles, ReadsAreTheSameOnAnyThreadCount) {
  Checkpoint ck = Checkpoint::open(dir.path());
  std::vector<float> r1(700 * 513), rn(700 * 513), b1(690 * 300), bn(690 * 300);
  ck.set_read_threads(1);
  ck.read_rows("big", 0, 700, r1.data());
  ck.read_block("big", 5, 695, 100, 400, b1.data());
  ck.set_read_threads(4);
  ck.read_rows("big", 0, 700, rn.data());
  ck.read_block("big", 5, 695, 100, 400, bn.data());
  EXPECT_EQ(std::memcmp(r1.data(), rn.data(), r1.size() * 4), 0);
  EXPECT_EQ(std::memcmp(b1.data(), bn.data(), b1.size() * 4), 0);
  for (int64_t r = 5; r < 695; ++r)
    for (int64_t j = 100; j < 400; ++j)
      ASSERT_EQ(bn[(r - 5) * 300 + j - 100], bf16_to_f32(f32_to_bf16(big[r * 513 + j])));
}

TEST_F(BigTensorFiles, StoredSlicesAreTheStoredBytes) {
  Checkpoint ck = Checkpoint::open(dir.path());
  const std::string file = test::read_file(dir / "model.safetensors");
  uint64_t header_len = 0;
  std::memcpy(&header_len, file.data(), 8);
  const TensorInfo* t = ck.find("big");
  ASSERT_NE(t, nullptr);
  const char* stored = file.data() + 8 + header_len + t->begin;

  const uint64_t before = ck.weight_bytes_read();
  const StoredSlice rows = ck.stored_rows("big", 10, 650);
  EXPECT_EQ(rows.dtype, DType::BF16);
  EXPECT_EQ(rows.rows, 640);
  EXPECT_EQ(rows.cols, 513);
  EXPECT_TRUE(rows.contiguous());
  ASSERT_EQ(rows.bytes(), size_t{640} * 513 * 2);
  EXPECT_EQ(std::memcmp(rows.data, stored + 10 * 513 * 2, rows.bytes()), 0);
  EXPECT_EQ(ck.weight_bytes_read() - before, rows.bytes());
  // The stored values are the writer's bf16 of the fp32 values.
  uint16_t v;
  std::memcpy(&v, rows.data + 2 * 7, 2);
  EXPECT_EQ(v, f32_to_bf16(big[10 * 513 + 7]));

  const StoredSlice blk = ck.stored_block("big", 3, 9, 20, 30);
  EXPECT_FALSE(blk.contiguous());
  EXPECT_EQ(blk.row_pitch, size_t{513} * 2);
  for (int64_t r = 0; r < 6; ++r)
    EXPECT_EQ(std::memcmp(blk.data + r * blk.row_pitch, stored + ((3 + r) * 513 + 20) * 2, 20), 0);

  const StoredSlice f = ck.stored_rows("vec", 100, 200);  // 1-D: elements
  EXPECT_EQ(f.dtype, DType::F32);
  EXPECT_EQ(f.bytes(), 400u);
  EXPECT_EQ(std::memcmp(f.data, vec.data() + 100, 400), 0);
  EXPECT_THROW(ck.stored_rows("big", 600, 701), InputError);
  EXPECT_GT(ck.advise_rows("big", 0, 700), 0u);
}

TEST_F(BigTensorFiles, StoredSlicesRejectNonFiniteValues) {
  big[123 * 513 + 45] = std::numeric_limits<float>::infinity();
  write_safetensors(dir / "model.safetensors", {{"big", DType::BF16, {700, 513}, big.data()},
                                                {"vec", DType::F32, {1000}, vec.data()}});
  Checkpoint ck = Checkpoint::open(dir.path());
  EXPECT_NO_THROW(ck.stored_rows("big", 0, 123));
  try {
    ck.stored_rows("big", 100, 700);
    FAIL() << "accepted an infinite weight";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("element " + std::to_string(23 * 513 + 45)),
              std::string::npos)
        << e.what();
  }
  std::vector<float> out(600 * 513);
  EXPECT_THROW(ck.read_rows("big", 100, 700, out.data()), InputError);
}

// The CUDA loader's path: unchecked slices (checked by the caller as it copies) and the error it
// raises must be stored_block's.
TEST_F(BigTensorFiles, UncheckedSlicesAreStoredSlicesWithoutTheCheck) {
  big[123 * 513 + 45] = std::numeric_limits<float>::infinity();
  write_safetensors(dir / "model.safetensors", {{"big", DType::BF16, {700, 513}, big.data()},
                                                {"vec", DType::F32, {1000}, vec.data()}});
  Checkpoint ck = Checkpoint::open(dir.path());
  std::string checked_error;
  try {
    ck.stored_block("big", 100, 700, 40, 60);
  } catch (const InputError& e) {
    checked_error = e.what();
  }
  ASSERT_NE(checked_error.find("non-finite"), std::string::npos) << checked_error;
  const uint64_t before = ck.weight_bytes_read();
  const StoredSlice s = ck.unchecked_block("big", 100, 700, 40, 60);
  EXPECT_EQ(ck.weight_bytes_read() - before, s.bytes());
  EXPECT_EQ(s.rows, 600);
  EXPECT_EQ(s.cols, 20);
  EXPECT_EQ(s.row_pitch, size_t{513} * 2);
  // The caller's check finds the value stored_block found, and reports it the same way.
  size_t element = 0;
  bool found = false;
  for (int64_t r = 0; r < s.rows && !found; ++r) {
    const char* row = s.data + r * s.row_pitch;
    if (any_non_finite(s.dtype, row, 20)) {
      element = static_cast<size_t>(r) * 20 + first_non_finite(s.dtype, row, 20);
      found = true;
    }
  }
  ASSERT_TRUE(found);
  EXPECT_EQ(element, size_t{23} * 20 + 5);
  try {
    ck.throw_non_finite("big", std::numeric_limits<float>::infinity(), element);
  } catch (const InputError& e) {
    EXPECT_EQ(std::string(e.what()), checked_error);
  }
  const StoredSlice rows = ck.unchecked_rows("vec", 10, 20);  // 1-D: elements
  EXPECT_EQ(rows.bytes(), 40u);
  EXPECT_EQ(std::memcmp(rows.data, vec.data() + 10, 40), 0);
  EXPECT_THROW(ck.unchecked_block("big", 0, 701, 0, 1), InputError);
}

// The CUDA loader reads pieces with pread (read_stored) rather than through the mapping: the same
// bytes, for whole slices, single rows of a block and pieces that end at the file's end.
TEST_F(BigTensorFiles, ReadStoredCopiesTheMappedBytes) {
  Checkpoint ck = Checkpoint::open(dir.path());
  const StoredSlice rows = ck.unchecked_rows("big", 0, 700);
  std::vector<char> got(rows.bytes(), 'x');
  ck.prefetch_stored(rows.data, rows.bytes());
  ck.read_stored(rows.data, rows.bytes(), got.data());
  EXPECT_EQ(std::memcmp(got.data(), rows.data, rows.bytes()), 0);
  const StoredSlice blk = ck.unchecked_block("big", 3, 9, 20, 31);  // odd width, strided
  for (int64_t r = 0; r < blk.rows; ++r) {
    char row[22];
    ck.read_stored(blk.data + r * blk.row_pitch, sizeof row, row);
    EXPECT_EQ(std::memcmp(row, blk.data + r * blk.row_pitch, sizeof row), 0) << "row " << r;
  }
  const StoredSlice last = ck.unchecked_rows("vec", 999, 1000);  // the file's last bytes
  float v = 0;
  ck.read_stored(last.data, 4, &v);
  EXPECT_EQ(v, vec[999]);
  // Past the end of the file, or outside every file: refused, nothing read.
  EXPECT_THROW(ck.read_stored(last.data, 8, got.data()), InputError);
  const char outside[4] = {};
  EXPECT_THROW(ck.read_stored(outside, 4, got.data()), InputError);
  ck.read_stored(outside, 0, got.data());  // nothing to read
}

// The CPU backend converts into buffers that are not zeroed first: the reads write every element,
// on any thread count, bit for bit as a serial conversion into zeroed memory does, for odd sizes
// that end inside a chunk and blocks whose rows are not contiguous.
TEST_F(BigTensorFiles, ReadsFillUninitialisedBuffersAsSerialReadsFillZeroedOnes) {
  Checkpoint ck = Checkpoint::open(dir.path());
  for (auto [r0, r1, c0, c1] : {std::tuple{0, 700, 0, 513}, std::tuple{1, 698, 0, 513},
                                std::tuple{5, 694, 3, 510}, std::tuple{0, 1, 0, 513}}) {
    const size_t n = static_cast<size_t>((r1 - r0) * (c1 - c0));
    std::vector<float> serial(n, 0.f);
    ck.set_read_threads(1);
    ck.read_block("big", r0, r1, c0, c1, serial.data());
    for (int threads : {2, 3, 8}) {
      UninitVector<float> out(n, std::numeric_limits<float>::quiet_NaN());  // poisoned
      out.clear();
      out.resize(n);  // not initialised: still the poison where the read would miss an element
      ck.set_read_threads(threads);
      ck.read_block("big", r0, r1, c0, c1, out.data());
      ASSERT_EQ(std::memcmp(out.data(), serial.data(), n * 4), 0)
          << "rows [" << r0 << ", " << r1 << ") cols [" << c0 << ", " << c1 << ") threads "
          << threads;
    }
  }
}

TEST(UninitAllocator, AlignsLargeBlocksToHugePagesAndKeepsValues) {
  for (size_t n : {size_t{1}, size_t{1000}, kHugeAllocMin / 4 - 1, kHugeAllocMin / 4,
                   kHugeAllocMin / 4 * 3 + 5}) {
    UninitVector<float> v(n, 1.5f);  // with a value: initialised as usual
    ASSERT_EQ(v.size(), n);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(v.data()) % alignof(std::max_align_t), 0u) << n;
    if (n * sizeof(float) >= kHugeAllocMin) {
      EXPECT_EQ(reinterpret_cast<uintptr_t>(v.data()) % kHugePageBytes, 0u) << n;
    }
    EXPECT_EQ(v.front(), 1.5f);
    EXPECT_EQ(v.back(), 1.5f);
    // Growth moves the values (the allocator's construct with an argument), and a copy compares
    // equal.
    v.resize(n + 3);
    v[n] = 2.f;
    EXPECT_EQ(v.front(), 1.5f);
    UninitVector<float> w = v;
    EXPECT_TRUE(std::equal(v.begin(), v.begin() + static_cast<ptrdiff_t>(n + 1), w.begin()));
  }
  UninitVector<double> d(kHugeAllocMin / 8);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(d.data()) % kHugePageBytes, 0u);
  UninitVector<float> empty;
  empty.resize(0);
  EXPECT_TRUE(empty.empty());
}

TEST(Conversion, AnyNonFiniteAgreesWithFirstNonFinite) {
  const auto bits = random_bits16(1 << 16, 23);  // every exponent pattern, NaN and inf included
  for (DType t : {DType::BF16, DType::F16, DType::F32, DType::F8E4M3}) {
    const size_t es = dtype_size(t), total = bits.size() * 2 / es;
    for (size_t n : {size_t{1}, size_t{7}, size_t{100}, size_t{1000}, total}) {
      for (size_t start = 0; start + n <= total; start += std::max<size_t>(n, total / 64)) {
        const char* p = reinterpret_cast<const char*>(bits.data()) + start * es;
        ASSERT_EQ(any_non_finite(t, p, n), first_non_finite(t, p, n) < n)
            << dtype_name(t) << " n " << n << " start " << start;
      }
    }
  }
}

// synth's generator (version 2, counter-based): tests/data/tiny_moe.json, seed 7 gives these bytes.
// The hash changes only with a new kSynthGeneratorVersion (docs/synth.md); it was taken from
// `sinkscope synth --config tests/data/tiny_moe.json --seed 7` when version 2 was made.
TEST(Writer, SynthOutputIsUnchangedForAFixedSeed) {
  TempDir dir;
  synthesize(
      parse_model_config(std::string(SINKSCOPE_TEST_SOURCE_DIR) + "/tests/data/tiny_moe.json"),
      dir.path(), false, 7);
  const std::string bytes = test::read_file(dir / "model.safetensors");
  EXPECT_EQ(sha256_hex(bytes.data(), bytes.size()),
            "9f9882af9f1b29a31d22184fbf70410a953734c0cf54fcf804f75d155254aa60");
  EXPECT_NE(bytes.find("\"sinkscope_synth_generator\":\"2\""), std::string::npos);
}

namespace {
// A planted qwen3_moe whose embedding and output head (50000 x 98 = 4.9 M values) span two of
// synth's 4 Mi-value chunks, the boundary falling inside row 42799 between its reserved columns
// BOS (1) and S (2): 42799 * 98 + 2 = 2^22.
ModelConfig two_chunk_config() {
  ModelConfig c =
      parse_model_config(std::string(SINKSCOPE_TEST_SOURCE_DIR) + "/tests/data/tiny_moe.json");
  c.vocab_size = 50000;
  c.hidden_size = 98;
  return parse_model_config_text(model_config_to_json(c), "two_chunk_config");
}
}  // namespace

TEST(Writer, SynthBytesDoNotDependOnTheThreadCount) {
  TempDir dir;
  const ModelConfig c = two_chunk_config();
  for (bool plant : {false, true}) {
    synthesize(c, dir / "t1", plant, 5, 1);
    synthesize(c, dir / "t3", plant, 5, 3);
    const std::string one = test::read_file(dir / "t1/model.safetensors");
    const std::string three = test::read_file(dir / "t3/model.safetensors");
    ASSERT_GT(one.size(), size_t{2} * 50000 * 98 * 2) << "plant " << plant;
    EXPECT_TRUE(one == three) << "plant " << plant;
  }
  // Another seed gives other weights.
  synthesize(c, dir / "s6", true, 6, 2);
  EXPECT_FALSE(test::read_file(dir / "t1/model.safetensors") ==
               test::read_file(dir / "s6/model.safetensors"));
}

TEST(Writer, SynthPlantsItsEditsAcrossChunkBoundaries) {
  TempDir dir;
  const ModelConfig c = two_chunk_config();
  synthesize(c, dir.path(), true, 5, 2);
  Checkpoint ck = Checkpoint::open(dir.path());
  const int64_t V = c.vocab_size, D = c.hidden_size;
  std::vector<float> emb(static_cast<size_t>(V * D));
  ck.read_rows(tensor_name(ck.config(), Role::kEmbed), 0, V, emb.data());
  int64_t random_nonzero = 0;
  for (int64_t t = 0; t < V; ++t) {
    const float* row = emb.data() + t * D;
    ASSERT_EQ(row[0], 3.f) << "row " << t;                 // CONST
    ASSERT_EQ(row[1], t == 1 ? 8.f : 0.f) << "row " << t;  // BOS
    ASSERT_EQ(row[2], 0.f) << "row " << t;                 // S
    ASSERT_EQ(row[3], 0.f) << "row " << t;                 // U
    for (int64_t j = 4; j < D; ++j) random_nonzero += row[j] != 0.f;
  }
  EXPECT_GT(random_nonzero, V * (D - 4) * 99 / 100);
  // The planted expert's down projection: rows S and U of every expert are 0 but the first 8
  // columns of row U of expert 2 (4).
  const int64_t I = c.moe_intermediate_size;
  std::vector<float> down(static_cast<size_t>(D * I));
  for (int64_t e = 0; e < c.num_experts; ++e) {
    ck.read_rows(tensor_name(ck.config(), Role::kExpertDown, 1, e), 0, D, down.data());
    for (int64_t j = 0; j < I; ++j) {
      EXPECT_EQ(down[2 * I + j], 0.f);
      EXPECT_EQ(down[3 * I + j], e == 2 && j < 8 ? 4.f : 0.f);
    }
  }
}

// The generator's values are N(0, 1) (times 1/sqrt(fan_in)): moments and tail shares of the 4.9 M
// values of the output head, which the planted circuit leaves alone.
TEST(Writer, SynthDrawsStandardNormals) {
  TempDir dir;
  const ModelConfig c = two_chunk_config();
  synthesize(c, dir.path(), false, 9, 2);
  Checkpoint ck = Checkpoint::open(dir.path());
  const int64_t V = c.vocab_size, D = c.hidden_size;
  std::vector<float> w(static_cast<size_t>(V * D));
  ck.read_rows(tensor_name(ck.config(), Role::kLmHead), 0, V, w.data());
  const double scale = std::sqrt(static_cast<double>(D)), n = static_cast<double>(w.size());
  double sum = 0, sum2 = 0, sum4 = 0, beyond2 = 0, beyond4 = 0, max_abs = 0;
  for (float v : w) {
    const double z = v * scale;
    sum += z;
    sum2 += z * z;
    sum4 += z * z * z * z;
    beyond2 += std::abs(z) > 2;
    beyond4 += std::abs(z) > 4;
    max_abs = std::max(max_abs, std::abs(z));
  }
  EXPECT_NEAR(sum / n, 0.0, 0.003);
  EXPECT_NEAR(sum2 / n, 1.0, 0.005);
  EXPECT_NEAR(sum4 / n, 3.0, 0.03);           // kurtosis of a normal
  EXPECT_NEAR(beyond2 / n, 0.0455, 0.002);    // P(|z| > 2)
  EXPECT_NEAR(beyond4 / n * 1e5, 6.33, 1.5);  // P(|z| > 4) = 6.33e-5: ~310 of 4.9 M
  EXPECT_LT(max_abs, 5.8);                    // u1 >= 2^-24 bounds |z| by 5.77
  // The two draws of one word (elements 2p, 2p + 1) are independent: neither they nor their
  // squares correlate (2.45 M pairs: the standard error of a correlation is 6.4e-4).
  double xy = 0, x2y2 = 0, x4 = 0;
  for (size_t i = 0; i + 1 < w.size(); i += 2) {
    const double x = w[i] * scale, y = w[i + 1] * scale;
    xy += x * y;
    x2y2 += x * x * y * y;
    x4 += x * x * x * x;
  }
  const double pairs = n / 2, var = sum2 / n;
  EXPECT_NEAR(xy / pairs / var, 0.0, 0.004);
  EXPECT_NEAR((x2y2 / pairs - var * var) / (x4 / pairs - var * var), 0.0, 0.006);
}
