// Synthetic checkpoints. The planted circuit (docs/synth.md) uses four reserved residual
// channels: CONST (every token, lets the router and the sink head's query see "always on"),
// BOS (only the BOS token), S (the P0 head's write) and U (the expert's write).
//
//   layer 0, head A:  its key at the BOS position is strongly negative for every query, so
//                     queries i >= 1 ignore position 0 while position 0 attends to itself (the
//                     causal mask leaves it nothing else); its value reads BOS, so its write
//                     (W_O -> channel S) is large at position 0 only.
//   layer 1, expert:  the router always picks it (reads CONST); gate and up read S, so
//                     silu(k s) * k s ~ k^2 s^2 is large only where S is; down writes it to U.
//   layer 2, head B:  its query reads CONST into one slowly-rotating dimension j*; its key reads
//                     U into the same dimension, so after k_norm the key at position 0 points
//                     along j* and every query attends to position 0.
// A acts on B only through the expert (a two-block circuit): the direct attribution goes to the
// expert; ablating A or the expert at position 0 removes the sink.
//
// Weights come from a counter-based generator (generator version 2): the value of element i of a
// tensor is a function of (seed, the tensor's name, i) alone, so any chunk of any tensor is drawn
// on any thread and the file is the same bytes whatever the thread count. The model is never held
// whole: every thread draws a chunk of at most kChunk elements, applies the planted circuit's edits
// that fall into it, rounds it to bf16 and writes it at its offset (the header, whose offsets the
// shapes fix, is written first).
#include "sinkscope/synth.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>

#include "checkpoint/omp_threads.hpp"
#include "sinkscope/checkpoint.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/family.hpp"

namespace sinkscope {
namespace fs = std::filesystem;

namespace {

constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ull;  // splitmix64's increment
constexpr int64_t kChunk = int64_t{1} << 22;         // elements per work item (8 MiB of bf16)

// splitmix64's finaliser: a bijection of 64-bit words whose every output bit depends on every
// input bit.
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

inline uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// FNV-1a of a tensor name.
uint64_t name_hash(const std::string& name) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char ch : name) {
    h ^= ch;
    h *= 0x100000001b3ull;
  }
  return h;
}

// Two N(0, 1) draws from one 64-bit word (Box-Muller): the low word's top 23 bits give
// u1 = (2k + 1) / 2^24 in (0, 1), the high word's top 2 bits a quadrant and its next 23 bits the
// angle inside it. Float arithmetic only (no libm call), compiled without FMA contraction
// (src/CMakeLists.txt): the same bits on every IEEE-754 machine, and the loop vectorises. The
// polynomials are accurate to a few float ulps, far below bf16's rounding; |z| <= 5.77.
inline void box_muller(uint32_t lo, uint32_t hi, float& z0, float& z1) {
  // Branch-free (selects are bit masks) so that the loop over words vectorises.
  const int32_t k = static_cast<int32_t>(lo >> 9);
  const float u1 = static_cast<float>(2 * k + 1) * 0x1p-24f;
  // ln u1 = e ln 2 + ln m with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(s), s = (m - 1) / (m + 1):
  // a mantissa above sqrt(2)'s (0x3504f3) moves m to [sqrt(1/2), 1) and e up by one.
  const uint32_t bits = float_bits(u1), mant = bits & 0x7fffffu;
  const uint32_t high = mant > 0x3504f3u ? 1u : 0u;
  const int32_t e = static_cast<int32_t>(bits >> 23) - 127 + static_cast<int32_t>(high);
  const float m = bits_float(mant | (0x3f800000u - (high << 23)));
  const float s = (m - 1.f) / (m + 1.f), s2 = s * s;
  const float atanh_s =
      s * (1.f + s2 * (1.f / 3 + s2 * (1.f / 5 + s2 * (1.f / 7 + s2 * (1.f / 9 + s2 / 11)))));
  const float ln_u1 = static_cast<float>(e) * 0.693147181f + 2.f * atanh_s;
  const float r = std::sqrt(-2.f * ln_u1);
  // The angle: quadrant q, phi in [0, pi/2); Taylor series of sin and cos on it.
  const uint32_t q = hi >> 30;
  const float phi =
      static_cast<float>(static_cast<int32_t>((hi >> 7) & 0x7fffffu)) * (1.57079633f * 0x1p-23f);
  const float x2 = phi * phi;
  const float sn =
      phi * (1.f - x2 / 6 * (1.f - x2 / 20 * (1.f - x2 / 42 * (1.f - x2 / 72 * (1.f - x2 / 110)))));
  const float cs =
      1.f -
      x2 / 2 *
          (1.f - x2 / 12 * (1.f - x2 / 30 * (1.f - x2 / 56 * (1.f - x2 / 90 * (1.f - x2 / 132)))));
  // (cos, sin) of q pi/2 + phi: q = 1: (-sin, cos), 2: (-cos, -sin), 3: (sin, -cos).
  const uint32_t swap = 0u - (q & 1u);  // all ones for q = 1, 3
  const uint32_t c = (float_bits(sn) & swap) | (float_bits(cs) & ~swap);
  const uint32_t sv = (float_bits(cs) & swap) | (float_bits(sn) & ~swap);
  const uint32_t neg_c = ((q + 1u) >> 1 & 1u) << 31, neg_s = (q >> 1) << 31;
  z0 = r * bits_float(c ^ neg_c);
  z1 = r * bits_float(sv ^ neg_s);
}

// Elements [e0, e0 + n) of the N(0, 1) stream `key`, times `scale`; e0 is even. Element 2p and
// 2p + 1 are the two draws of word p = mix64(key + p kGolden). out holds n rounded up to even.
void normal_range(uint64_t key, int64_t e0, int64_t n, float scale, float* out) {
  constexpr int64_t kBlock = 512;
  uint32_t lo[kBlock], hi[kBlock];
  float a[kBlock], b[kBlock];
  const int64_t pairs = (n + 1) / 2, p0 = e0 / 2;
  for (int64_t base = 0; base < pairs; base += kBlock) {
    const int64_t m = std::min(kBlock, pairs - base);
    for (int64_t j = 0; j < m; ++j) {
      const uint64_t h = mix64(key + static_cast<uint64_t>(p0 + base + j) * kGolden);
      lo[j] = static_cast<uint32_t>(h);
      hi[j] = static_cast<uint32_t>(h >> 32);
    }
    for (int64_t j = 0; j < m; ++j) box_muller(lo[j], hi[j], a[j], b[j]);
    float* o = out + 2 * base;
    for (int64_t j = 0; j < m; ++j) {
      o[2 * j] = a[j] * scale;
      o[2 * j + 1] = b[j] * scale;
    }
  }
}

// How a tensor's values are made.
enum class Fill { kNormal, kOnes, kZeros };

// A planted-circuit edit: set the block rows [r0, r1) x columns [c0, c1) of a tensor's 2-D view
// ([prod(shape[:-1]), shape[-1]]; 1-D: one row) to `value`. Edits of a tensor apply in the order
// they were made.
struct Edit {
  int64_t r0, r1, c0, c1;
  float value;
};

struct TensorPlan {
  std::string name;
  std::vector<int64_t> shape;
  int64_t elements = 1, cols = 1;
  Fill fill = Fill::kZeros;
  float stddev = 0.f;
  uint64_t key = 0;
  std::vector<Edit> edits;
};

// Chunk [e0, e0 + n) of tensor t with its edits, as fp32.
void draw_chunk(const TensorPlan& t, int64_t e0, int64_t n, float* v) {
  if (t.fill == Fill::kNormal)
    normal_range(t.key, e0, n, t.stddev, v);
  else
    std::fill(v, v + n, t.fill == Fill::kOnes ? 1.f : 0.f);
  const int64_t e1 = e0 + n;
  for (const Edit& ed : t.edits) {
    const int64_t ra = std::max(ed.r0, e0 / t.cols), rb = std::min(ed.r1, (e1 - 1) / t.cols + 1);
    for (int64_t r = ra; r < rb; ++r) {
      const int64_t a = std::max(r * t.cols + ed.c0, e0), b = std::min(r * t.cols + ed.c1, e1);
      for (int64_t i = a; i < b; ++i) v[i - e0] = ed.value;
    }
  }
}

bool ends_with(const std::string& s, const char* suffix) {
  const size_t n = std::char_traits<char>::length(suffix);
  return s.size() > n && s.compare(s.size() - n, n, suffix) == 0;
}

}  // namespace

PlantedCircuit synthesize(const ModelConfig& shape, const std::string& out, bool plant,
                          uint64_t seed, int threads) {
  // Round trip through config.json: what is written is exactly what a reader will see (family,
  // defaults of the family, rotary dims).
  const ModelConfig c = parse_model_config_text(model_config_to_json(shape), "synth config");
  const int64_t D = c.hidden_size, d = c.head_dim, H = c.num_heads, KV = c.num_kv_heads,
                V = c.vocab_size;
  PlantedCircuit pc;
  if (plant) {
    if (c.qk_norm == QkNormKind::kFullWidth || c.block != BlockKind::kPreNorm || !c.family->moe ||
        c.mla() || c.family->gpt_oss_layout)
      throw InputError(
          "synth --plant-circuit: needs a pre-norm MoE family with per-head or no "
          "q/k norms (qwen3_moe, qwen2_moe, mixtral); model_type is " +
          c.model_type);
    if (c.num_layers < 3) throw InputError("synth --plant-circuit: needs at least 3 layers");
    if (!c.is_moe_layer(1)) throw InputError("synth --plant-circuit: layer 1 must be an MoE layer");
    if (D < 8) throw InputError("synth --plant-circuit: hidden_size must be at least 8");
    if (d < 4) throw InputError("synth --plant-circuit: head_dim must be at least 4");
    if (V < 2) throw InputError("synth --plant-circuit: vocab_size must be at least 2");
    pc.head = H > 1 ? 1 : 0;
    pc.expert = c.num_experts > 2 ? 2 : 0;
    pc.sink_head = 0;
    pc.bos_token_id = 1;
  }
  if (!fs::is_directory(out)) {
    std::error_code ec;
    fs::create_directories(out, ec);
    if (ec)
      throw InputError("synth --out " + out + ": cannot create folder (" + ec.message() + ")");
  }
  const int64_t CONST = 0, BOS = 1, S = 2, U = 3;  // reserved channels when planting

  // Every tensor the family asks for: matrices ~ N(0, 1/fan_in), norm gains 1, biases 0; the
  // embedding ~ N(0, 1). Each tensor draws from its own stream, keyed by the seed and its name.
  std::vector<TensorPlan> tensors;
  std::map<std::string, size_t> index;
  const std::string embed_name = tensor_name(c, Role::kEmbed);
  const uint64_t seed_key = mix64(seed + kGolden);
  for (const RequiredTensor& rt : required_tensors(c, nullptr, false)) {
    TensorPlan t;
    t.name = rt.name;
    t.shape = rt.shape;
    for (auto dim : rt.shape) t.elements *= dim;
    t.cols = rt.shape.empty() ? 1 : rt.shape.back();
    t.key = mix64(seed_key ^ name_hash(rt.name));
    const bool is_bias = ends_with(rt.name, ".bias");
    if (rt.name == embed_name || ends_with(rt.name, ".sinks")) {  // gpt-oss sink logits ~ N(0, 1)
      t.fill = Fill::kNormal;
      t.stddev = 1.f;
    } else if (ends_with(rt.name, "e_score_correction_bias")) {
      t.fill = Fill::kNormal;  // DeepSeek's selection bias: small, so that it changes some choices
      t.stddev = 0.05f;
    } else if (rt.shape.size() == 1 && !is_bias) {
      t.fill = Fill::kOnes;
    } else if (rt.shape.size() >= 2) {
      t.fill = Fill::kNormal;
      t.stddev = 1.f / std::sqrt(static_cast<float>(rt.shape.back()));
    }
    index.emplace(t.name, tensors.size());
    tensors.push_back(std::move(t));
  }

  // The planted circuit, as edits of the drawn tensors (docs/synth.md).
  auto set = [&](Role role, int64_t l, int64_t e, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                 float value) {
    const std::string name = tensor_name(c, role, l, e);
    const auto it = index.find(name);
    if (it == index.end())
      throw InputError("synth --plant-circuit: " + c.model_type + " has no tensor " + name);
    tensors[it->second].edits.push_back({r0, r1, c0, c1, value});
  };
  if (plant) {
    set(Role::kEmbed, -1, -1, 0, V, CONST, CONST + 1, 3.f);
    set(Role::kEmbed, -1, -1, 0, V, BOS, U + 1, 0.f);  // BOS, S and U
    set(Role::kEmbed, -1, -1, pc.bos_token_id, pc.bos_token_id + 1, BOS, BOS + 1, 8.f);
  }
  const int64_t jstar = d / 2 - 1;  // the most slowly rotating RoPE dimension
  // Without q/k norms the planted dimension j* gets its gain of 2 from the projections instead.
  const bool qk_norm = c.qk_norm == QkNormKind::kPerHead;
  const float w_gain = qk_norm ? 1.f : 2.f;
  const int64_t qw = H * d;  // o_proj's columns
  for (int64_t l = 0; plant && l < c.num_layers; ++l) {
    // Keep the reserved channels clean of other components' writes.
    set(Role::kO, l, -1, S, U + 1, 0, qw, 0.f);
    if (l == pc.head_layer) {
      // Head A: its query reads CONST and its key reads -BOS in dimension j*, so every query
      // i >= 1 avoids the BOS position; position 0 can only attend to itself. Its value reads
      // BOS, so z[0] carries the BOS feature and z[i >= 1] almost none.
      const int64_t g = pc.head / (H / KV), qr = pc.head * d + jstar, kr = g * d + jstar;
      set(Role::kQ, l, -1, pc.head * d, pc.head * d + d, 0, D, 0.f);
      set(Role::kQ, l, -1, qr, qr + 1, CONST, CONST + 1, w_gain);
      set(Role::kK, l, -1, kr, kr + 1, 0, D, 0.f);
      set(Role::kK, l, -1, kr, kr + 1, BOS, BOS + 1, -w_gain);
      if (qk_norm) {
        set(Role::kQNorm, l, -1, 0, 1, jstar, jstar + 1, 2.f);
        set(Role::kKNorm, l, -1, 0, 1, jstar, jstar + 1, 2.f);
      }
      set(Role::kV, l, -1, g * d, g * d + 1, 0, D, 0.f);
      set(Role::kV, l, -1, g * d, g * d + 1, BOS, BOS + 1, 1.f);
      for (int64_t h = 0; h < H; ++h)  // only head A passes value dim 0 on, into channel S
        if (h / (H / KV) == g) set(Role::kO, l, -1, 0, D, h * d, h * d + 1, 0.f);
      set(Role::kO, l, -1, S, S + 1, pc.head * d, pc.head * d + 1, 1.f);
    }
    if (l == pc.sink_layer) {
      const int64_t g = pc.sink_head / (H / KV), qr = pc.sink_head * d + jstar, kr = g * d + jstar;
      set(Role::kQ, l, -1, pc.sink_head * d, pc.sink_head * d + d, 0, D, 0.f);
      set(Role::kQ, l, -1, qr, qr + 1, CONST, CONST + 1, w_gain);
      set(Role::kK, l, -1, kr, kr + 1, 0, D, 0.f);
      set(Role::kK, l, -1, kr, kr + 1, U, U + 1, w_gain);
      if (qk_norm) {
        set(Role::kQNorm, l, -1, 0, 1, jstar, jstar + 1, 2.f);
        set(Role::kKNorm, l, -1, 0, 1, jstar, jstar + 1, 2.f);
      }
    }
    if (c.is_moe_layer(l)) {
      const int64_t E = c.num_experts, I = c.moe_intermediate_size;
      if (c.has_shared_expert())  // the shared expert stays out of the reserved channels
        set(Role::kSharedDown, l, -1, S, U + 1, 0, c.shared_expert_intermediate_size, 0.f);
      set(Role::kRouter, l, -1, 0, E, CONST, CONST + 1, 0.f);
      if (l == pc.expert_layer)
        set(Role::kRouter, l, -1, pc.expert, pc.expert + 1, CONST, CONST + 1, 8.f);
      for (int64_t e = 0; e < E; ++e) {
        set(Role::kExpertDown, l, e, S, U + 1, 0, I, 0.f);
        if (l == pc.expert_layer && e == pc.expert) {
          const int64_t units = std::min<int64_t>(I, 8);
          for (Role role : {Role::kExpertGate, Role::kExpertUp}) {
            set(role, l, e, 0, units, 0, D, 0.f);
            set(role, l, e, 0, units, S, S + 1, 2.f);
          }
          set(Role::kExpertDown, l, e, 0, D, 0, units, 0.f);
          set(Role::kExpertDown, l, e, U, U + 1, 0, units, 4.f);
        }
      }
    } else {
      set(Role::kMlpDown, l, -1, S, U + 1, 0, c.intermediate_size, 0.f);
    }
  }

  // Draw and write, chunk by chunk on every thread; the header first.
  std::vector<SafetensorsFileWriter::Tensor> layout;
  for (const auto& t : tensors) layout.push_back({t.name, DType::BF16, t.shape});
  const fs::path dir(out);
  SafetensorsFileWriter file(
      (dir / "model.safetensors").string(), layout,
      {{"sinkscope_synth_generator", std::to_string(kSynthGeneratorVersion)}});
  struct Item {
    size_t tensor;
    int64_t begin, count;
  };
  std::vector<Item> items;
  for (size_t i = 0; i < tensors.size(); ++i)
    for (int64_t e = 0; e < tensors[i].elements; e += kChunk)
      items.push_back({i, e, std::min(kChunk, tensors[i].elements - e)});
  const int nthreads = threads > 0 ? threads : max_threads();
  std::exception_ptr error;
  std::mutex error_mutex;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> values(static_cast<size_t>(kChunk) + 2);
    std::vector<uint16_t> bf16(static_cast<size_t>(kChunk));
#pragma omp for schedule(dynamic, 1)
    for (size_t it = 0; it < items.size(); ++it) {
      {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (error) continue;
      }
      try {
        const Item& item = items[it];
        draw_chunk(tensors[item.tensor], item.begin, item.count, values.data());
        for (int64_t i = 0; i < item.count; ++i) bf16[i] = f32_to_bf16(values[i]);
        file.write(item.tensor, static_cast<uint64_t>(item.begin) * 2, bf16.data(),
                   static_cast<size_t>(item.count) * 2);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
  file.finish();

  ModelConfig written = c;
  written.dtype = "bfloat16";
  {
    nlohmann::json j = nlohmann::json::parse(model_config_to_json(written));
    if (plant) j["bos_token_id"] = pc.bos_token_id;
    std::ofstream f(dir / "config.json");
    f << j.dump(2) << "\n";
    if (!f) throw InputError("synth: cannot write " + (dir / "config.json").string());
  }
  if (plant) {
    nlohmann::json j = {{"head_layer", pc.head_layer},        {"head", pc.head},
                        {"expert_layer", pc.expert_layer},    {"expert", pc.expert},
                        {"sink_layer", pc.sink_layer},        {"sink_head", pc.sink_head},
                        {"bos_token_id", pc.bos_token_id},    {"seed", seed},
                        {"generator", kSynthGeneratorVersion}};
    std::ofstream f(dir / "planted_circuit.json");
    f << j.dump(2) << "\n";
  }
  return pc;
}

}  // namespace sinkscope
