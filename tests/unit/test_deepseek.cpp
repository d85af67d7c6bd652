// DeepSeek-V3 pieces that need no transformers fixture: the FP8 E4M3 decode against the format
// (OCP 8-bit floating point, E4M3 "fn"), block-scaled FP8 reads with partial blocks, the config's
// yarn / MLA / routing keys, the sigmoid group-limited router, and a synthetic checkpoint whose
// FP8 form analyses exactly like its dequantised form.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <nlohmann/json.hpp>

#include "cpu/mla.hpp"
#include "sinkscope/analyze.hpp"
#include "sinkscope/checkpoint.hpp"
#include "sinkscope/comm.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/family.hpp"
#include "sinkscope/probes.hpp"
#include "sinkscope/synth.hpp"
#include "test_util.hpp"

using namespace sinkscope;
using sinkscope::test::TempDir;

namespace {

const std::string kTinyDeepseek =
    std::string(SINKSCOPE_TEST_SOURCE_DIR) + "/tests/data/tiny_deepseek_v3.json";

TEST(Fp8E4M3, DecodesEveryCodeAsTheFormatDefines) {
  // value = (-1)^S 2^(E-7) (1 + M/8) for E in 1..15 (except E=15, M=7: NaN); E=0: 2^-6 M/8.
  for (int code = 0; code < 256; ++code) {
    const int s = code >> 7, e = (code >> 3) & 15, m = code & 7;
    const float got = e4m3_to_f32(static_cast<uint8_t>(code));
    if (e == 15 && m == 7) {
      EXPECT_TRUE(std::isnan(got)) << code;
      continue;
    }
    const double mag = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7);
    EXPECT_EQ(static_cast<double>(got), s ? -mag : mag) << "code " << code;
  }
  EXPECT_EQ(e4m3_to_f32(0x7e), 448.f);                // the largest finite value
  EXPECT_EQ(e4m3_to_f32(0x01), std::ldexp(1.f, -9));  // the smallest subnormal
  EXPECT_EQ(e4m3_to_f32(0x08), std::ldexp(1.f, -6));  // the smallest normal
  EXPECT_EQ(e4m3_to_f32(0x38), 1.f);
  EXPECT_EQ(e4m3_to_f32(0xb8), -1.f);
  EXPECT_EQ(dtype_size(DType::F8E4M3), 1u);
  float buf[2];
  const uint8_t raw[2] = {0x3c, 0xc4};  // 1.5, -3
  convert_to_f32(DType::F8E4M3, raw, 2, buf);
  EXPECT_EQ(buf[0], 1.5f);
  EXPECT_EQ(buf[1], -3.f);
  EXPECT_EQ(first_non_finite(DType::F8E4M3, "\x38\x7f", 2), 1u);
}

TEST(Fp8E4M3, EncodesToNearestEvenAndSaturates) {
  for (int code = 0; code < 256; ++code) {
    if ((code & 0x7f) != 0x7f) {
      EXPECT_EQ(f32_to_e4m3(e4m3_to_f32(static_cast<uint8_t>(code))), code) << code;
    }
  }
  EXPECT_EQ(f32_to_e4m3(1.0625f), 0x38);  // halfway between 1 and 1.125: the even mantissa
  EXPECT_EQ(f32_to_e4m3(1.1875f), 0x3a);  // halfway between 1.125 and 1.25
  EXPECT_EQ(f32_to_e4m3(1000.f), 0x7e);
  EXPECT_EQ(f32_to_e4m3(-1000.f), 0xfe);
  EXPECT_EQ(f32_to_e4m3(std::ldexp(1.f, -11)), 0x00);  // a quarter of the smallest subnormal
}

// A safetensors file with tensors of any dtype, raw bytes given.
struct RawTensor {
  std::string name, dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};
void write_raw_safetensors(const std::string& path, const std::vector<RawTensor>& ts) {
  nlohmann::json h = nlohmann::json::object();
  uint64_t off = 0;
  for (const auto& t : ts) {
    h[t.name] = {
        {"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {off, off + t.bytes.size()}}};
    off += t.bytes.size();
  }
  std::string text = h.dump();
  while (text.size() % 8) text.push_back(' ');
  std::string out(8, '\0');
  const uint64_t n = text.size();
  std::memcpy(out.data(), &n, 8);
  out += text;
  for (const auto& t : ts) out += t.bytes;
  sinkscope::test::write_file(path, out);
}

std::string f32_bytes(const std::vector<float>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * 4);
}

// Rewrites a synthesized checkpoint with every 2-D weight of the decoder layers except the
// router in FP8 with block x block scales (block rows and columns as the config says); returns
// the dequantised values by name and writes their f32 checkpoint to `dequant_dir`.
void to_fp8(const std::string& dir, const std::string& dequant_dir, int64_t block) {
  const Checkpoint ck = Checkpoint::open(dir);
  std::vector<RawTensor> fp8, plain;
  for (const TensorInfo& t : ck.tensors()) {
    int64_t n = 1;
    for (auto d : t.shape) n *= d;
    std::vector<float> v(static_cast<size_t>(n));
    ck.read_rows(t.name, 0, t.shape[0], v.data());
    const bool quantise = t.shape.size() == 2 && t.name.find(".layers.") != std::string::npos &&
                          t.name.find("mlp.gate.weight") == std::string::npos;
    if (!quantise) {
      fp8.push_back({t.name, "F32", t.shape, f32_bytes(v)});
      plain.push_back(fp8.back());
      continue;
    }
    const int64_t R = t.shape[0], Cc = t.shape[1], br = (R + block - 1) / block,
                  bc = (Cc + block - 1) / block;
    std::vector<float> scale(static_cast<size_t>(br * bc), 1.f), deq(v.size());
    std::string q(static_cast<size_t>(n), '\0');
    for (int64_t i = 0; i < br; ++i)
      for (int64_t j = 0; j < bc; ++j) {
        float amax = 0;
        for (int64_t r = i * block; r < std::min(R, (i + 1) * block); ++r)
          for (int64_t c = j * block; c < std::min(Cc, (j + 1) * block); ++c)
            amax = std::max(amax, std::fabs(v[r * Cc + c]));
        const float s = amax > 0 ? amax / 448.f : 1.f;
        scale[i * bc + j] = s;
        for (int64_t r = i * block; r < std::min(R, (i + 1) * block); ++r)
          for (int64_t c = j * block; c < std::min(Cc, (j + 1) * block); ++c) {
            const uint8_t code = f32_to_e4m3(v[r * Cc + c] / s);
            q[r * Cc + c] = static_cast<char>(code);
            deq[r * Cc + c] = e4m3_to_f32(code) * s;
          }
      }
    fp8.push_back({t.name, "F8_E4M3", t.shape, q});
    fp8.push_back({fp8_scale_name(t.name), "F32", {br, bc}, f32_bytes(scale)});
    plain.push_back({t.name, "F32", t.shape, f32_bytes(deq)});
  }
  write_raw_safetensors(dir + "/model.safetensors", fp8);
  std::filesystem::create_directories(dequant_dir);
  write_raw_safetensors(dequant_dir + "/model.safetensors", plain);
  std::filesystem::copy_file(dir + "/config.json", dequant_dir + "/config.json");
  auto j = nlohmann::json::parse(std::ifstream(dir + "/config.json"));
  j["quantization_config"] = {
      {"quant_method", "fp8"}, {"fmt", "e4m3"}, {"weight_block_size", {block, block}}};
  sinkscope::test::write_file(dir + "/config.json", j.dump(2));
}

TEST(DeepseekV3, ConfigReadsMlaRoutingAndYarn) {
  const ModelConfig c = parse_model_config(kTinyDeepseek);
  EXPECT_TRUE(c.mla());
  EXPECT_EQ(c.head_dim, 12);  // qk_nope + qk_rope
  EXPECT_EQ(c.value_dim(), 6);
  EXPECT_EQ(c.rope.rotary_dim, 4);
  EXPECT_TRUE(c.rope.interleave);
  EXPECT_EQ(c.router, RouterKind::kSigmoidGroupTopK);
  EXPECT_EQ(c.num_experts, 8);
  EXPECT_EQ(c.shared_expert_intermediate_size, 12);
  EXPECT_FALSE(c.shared_expert_gated);
  EXPECT_FALSE(c.is_moe_layer(0));
  EXPECT_TRUE(c.is_moe_layer(1));
  // yarn: attention factor mscale(4, 1) / mscale(4, 0.8); softmax scale 12^-0.5 mscale(4, 0.8)^2.
  const double m1 = 0.1 * std::log(4.0) + 1, m08 = 0.08 * std::log(4.0) + 1;
  EXPECT_NEAR(c.rope.attention_factor, m1 / m08, 1e-12);
  EXPECT_NEAR(c.softmax_scale, m08 * m08 / std::sqrt(12.0), 1e-12);
  // Correction range for dim 4, base 1e4, 32 original positions: low = floor(-0.40) -> 0, high =
  // ceil(0.354) = 1: pair 0 extrapolates, pair 1 is interpolated (/ factor).
  const auto f = c.rope.inv_freq(c.head_dim);
  ASSERT_EQ(f.size(), 2u);
  EXPECT_NEAR(f[0], 1.0, 1e-12);
  EXPECT_NEAR(f[1], 1.0 / std::pow(1e4, 0.5) / 4.0, 1e-9);
  // The JSON synth writes reads back to the same model.
  const ModelConfig back = parse_model_config_text(model_config_to_json(c), "round trip");
  EXPECT_EQ(back.head_dim, c.head_dim);
  EXPECT_EQ(back.mlp_only_layers, c.mlp_only_layers);
  EXPECT_NEAR(back.softmax_scale, c.softmax_scale, 1e-12);
  EXPECT_NEAR(back.rope.attention_factor, c.rope.attention_factor, 1e-12);
  EXPECT_EQ(back.n_group, 4);
  EXPECT_EQ(back.routed_scaling_factor, 2.5);
}

TEST(DeepseekV3, ConfigRefusesWhatItCannotRun) {
  auto j = nlohmann::json::parse(std::ifstream(kTinyDeepseek));
  auto refused = [&](const char* key, nlohmann::json value, const char* words) {
    auto k = j;
    k[key] = value;
    try {
      parse_model_config_text(k.dump(), "c.json");
      ADD_FAILURE() << key << " accepted";
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find(words), std::string::npos) << e.what();
    }
  };
  refused("n_group", 3, "n_group");
  refused("topk_group", 5, "topk_group");
  refused("scoring_func", "softmax", "scoring_func");
  refused("attention_bias", true, "attention_bias");
  refused("num_key_value_heads", 2, "num_key_value_heads");
  refused("quantization_config", {{"quant_method", "gptq"}}, "quant_method 'gptq'");
  refused("quantization_config", {{"quant_method", "fp8"}, {"weight_block_size", {128}}},
          "weight_block_size");
  auto k = j;
  k["q_lora_rank"] = nullptr;  // V2-Lite style: a plain q_proj
  EXPECT_EQ(parse_model_config_text(k.dump(), "c.json").mla_q_rank, 0);
}

TEST(DeepseekV3, SigmoidGroupRouting) {
  ModelConfig c = parse_model_config(kTinyDeepseek);  // 8 experts, 4 groups of 2, top 2 groups
  // Scores sigmoid(logit): group 3 has the best single expert (7) but group sums pick groups 0, 1.
  const float logits[8] = {1.0f, 0.9f, 0.8f, 0.7f, -3.f, -3.f, -4.f, 3.f};
  const float bias[8] = {0, 0, 0, 0, 0, 0, 0, -0.9f};  // corrected 7: 0.95 - 0.9
  int32_t topk[2];
  float w[2];
  cpu::route_sigmoid_groups(c, logits, 1, bias, topk, w);
  EXPECT_EQ(topk[0], 0);
  EXPECT_EQ(topk[1], 1);
  const float s0 = 1 / (1 + std::exp(-1.0f)), s1 = 1 / (1 + std::exp(-0.9f));
  EXPECT_NEAR(w[0], s0 / (s0 + s1) * 2.5f, 1e-6);  // uncorrected scores, renormalised, scaled
  EXPECT_NEAR(w[1], s1 / (s0 + s1) * 2.5f, 1e-6);
  // The bias decides selection only: a large bias on expert 3 selects it, its weight is still
  // its uncorrected score; without renormalisation weights are score x scaling factor.
  const float bias2[8] = {0, 0, 0, 1.f, 0, 0, 0, -0.9f};
  c.norm_topk_prob = false;
  cpu::route_sigmoid_groups(c, logits, 1, bias2, topk, w);
  EXPECT_EQ(topk[0], 3);
  EXPECT_EQ(topk[1], 0);
  EXPECT_NEAR(w[0], 2.5f / (1 + std::exp(-0.7f)), 1e-6);
}

TEST(DeepseekV3, Fp8BlockScalesPartialBlocksAndErrors) {
  // A 2-D FP8 tensor of 20 x 37 with 16 x 16 blocks: 2 x 3 blocks, the last row and column
  // partial; reads of any row range and column block apply each element's block scale.
  TempDir tmp;
  const ModelConfig base = parse_model_config(kTinyDeepseek);
  synthesize(base, tmp.path(), false, 11);
  to_fp8(tmp.path(), tmp / "deq", 16);
  const Checkpoint ck = Checkpoint::open(tmp.path());
  const Checkpoint dq = Checkpoint::open(tmp / "deq");
  validate_checkpoint(ck);
  EXPECT_EQ(ck.config().fp8_block_rows, 16);
  const std::string name = tensor_name(ck.config(), Role::kKvB, 1);  // [4 * 14, 20]
  const TensorInfo* t = ck.find(name);
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->dtype, DType::F8E4M3);
  const int64_t R = t->shape[0], Cc = t->shape[1];
  std::vector<float> a(static_cast<size_t>(R * Cc)), b(a.size());
  ck.read_rows(name, 0, R, a.data());
  dq.read_rows(name, 0, R, b.data());
  EXPECT_EQ(a, b);
  std::vector<float> blk(static_cast<size_t>((R - 13) * 9)), want(blk.size());
  ck.read_block(name, 13, R, 11, 20, blk.data());  // crosses a row block and a column block
  for (int64_t r = 13; r < R; ++r)
    for (int64_t c = 11; c < 20; ++c) want[(r - 13) * 9 + (c - 11)] = b[r * Cc + c];
  EXPECT_EQ(blk, want);
  std::vector<float> row(static_cast<size_t>(Cc));
  ck.read_rows(name, R - 1, R, row.data());
  EXPECT_EQ(row, std::vector<float>(b.end() - Cc, b.end()));
  EXPECT_THROW(ck.stored_rows(name, 0, 1), InputError);  // the CUDA path refuses FP8 by name

  // Same analysis as the dequantised checkpoint, bit for bit.
  auto world = make_single_comm();
  const IntArray probes = make_probes("random:2:10:3", base.vocab_size);
  AnalyzeOptions o;
  o.model = tmp.path();
  const Analysis fa = analyze_checkpoint(o, probes, *world);
  o.model = tmp / "deq";
  const Analysis da = analyze_checkpoint(o, probes, *world);
  EXPECT_EQ(fa.sink_score.data, da.sink_score.data);
  EXPECT_EQ(fa.attr_head.data, da.attr_head.data);
  EXPECT_LT(fa.meta.circuit_identity_max_rel_err, 1e-4);

  // Bad scales: one line naming the tensor.
  auto j = nlohmann::json::parse(std::ifstream(tmp / "config.json"));
  auto expect_refused = [&](const std::string& words) {
    try {
      const Checkpoint bad = Checkpoint::open(tmp.path());
      validate_checkpoint(bad);
      ADD_FAILURE() << "accepted";
    } catch (const InputError& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find(words), std::string::npos) << m;
      EXPECT_EQ(m.find('\n'), std::string::npos);
    }
  };
  j["quantization_config"]["weight_block_size"] = {8, 8};  // the scales no longer fit the grid
  sinkscope::test::write_file(tmp / "config.json", j.dump());
  expect_refused("_scale_inv' has shape");
  j["quantization_config"]["weight_block_size"] = {16, 16};
  sinkscope::test::write_file(tmp / "config.json", j.dump());
  // A BF16 scale tensor and a missing one.
  const Checkpoint good = Checkpoint::open(tmp.path());
  std::vector<RawTensor> ts;
  for (const TensorInfo& ti : good.tensors()) {
    std::ifstream in(tmp / "model.safetensors", std::ios::binary);
    uint64_t hl = 0;
    in.read(reinterpret_cast<char*>(&hl), 8);
    in.seekg(static_cast<std::streamoff>(8 + hl + ti.begin));
    std::string bytes(static_cast<size_t>(ti.end - ti.begin), '\0');
    in.read(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    ts.push_back({ti.name, ti.dtype_str, ti.shape, bytes});
  }
  auto with = [&](const std::function<void(std::vector<RawTensor>&)>& edit) {
    auto copy = ts;
    edit(copy);
    write_raw_safetensors(tmp / "model.safetensors", copy);
  };
  const std::string sname = fp8_scale_name(name);
  with([&](std::vector<RawTensor>& v) {
    for (auto& x : v)
      if (x.name == sname) {
        x.dtype = "BF16";
        x.bytes.resize(x.bytes.size() / 2);
      }
  });
  expect_refused("FP8 block scales must be F32");
  with([&](std::vector<RawTensor>& v) {
    v.erase(std::remove_if(v.begin(), v.end(), [&](const RawTensor& x) { return x.name == sname; }),
            v.end());
  });
  expect_refused("but its scale '" + sname + "' is missing");
}

TEST(DeepseekV3, SynthCheckpointAnalysesWithTheIdentity) {
  TempDir tmp;
  synthesize(parse_model_config(kTinyDeepseek), tmp.path(), false, 5);
  const Checkpoint ck = Checkpoint::open(tmp.path());
  validate_checkpoint(ck);
  EXPECT_NE(ck.find("model.layers.0.self_attn.kv_a_proj_with_mqa.weight"), nullptr);
  EXPECT_NE(ck.find("model.layers.1.mlp.shared_experts.up_proj.weight"), nullptr);
  EXPECT_NE(ck.find("model.layers.1.mlp.gate.e_score_correction_bias"), nullptr);
  EXPECT_EQ(ck.find("model.layers.0.mlp.gate.weight"), nullptr);  // first_k_dense_replace = 1
  auto world = make_single_comm();
  AnalyzeOptions o;
  o.model = tmp.path();
  o.ablate = "layers=1-1";
  const Analysis a = analyze_checkpoint(o, make_probes("random:3:16:1", 64), *world);
  EXPECT_LT(a.meta.circuit_identity_max_rel_err, 1e-4);
  double attr = 0, shared = 0;
  for (float v : a.attr_head.data) attr = std::max<double>(attr, std::fabs(v));
  for (float v : a.attr_shared_expert.data) shared = std::max<double>(shared, std::fabs(v));
  EXPECT_GT(attr, 1e-6);
  EXPECT_GT(shared, 1e-6);  // the ungated shared expert is a component of its own
}

}  // namespace
