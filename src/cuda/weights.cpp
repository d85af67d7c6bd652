#include "cuda/weights.hpp"

#include <algorithm>
#include <cmath>

#include "cuda/check.hpp"
#include "cuda/gemm.hpp"
#include "cuda/kernels.cuh"
#include "sinkscope/checkpoint.hpp"
#include "sinkscope/family.hpp"

namespace sinkscope::cuda {
namespace {

// Host fp32 -> device bf16 at dst (synchronous: the host vector may go away afterwards).
void upload_bf16(const std::vector<float>& src, bf16_bits* dst) {
  std::vector<bf16_bits> tmp(src.size());
  std::transform(src.begin(), src.end(), tmp.begin(), [](float v) { return f32_to_bf16(v); });
  CUDA_CHECK(cudaMemcpy(dst, tmp.data(), tmp.size() * sizeof(bf16_bits), cudaMemcpyHostToDevice));
}

void upload_f32(const std::vector<float>& src, DeviceBuffer<float>& dst) {
  dst.reserve(src.size());
  CUDA_CHECK(cudaMemcpy(dst.get(), src.data(), src.size() * sizeof(float), cudaMemcpyHostToDevice));
}

std::vector<float> read_rows(const Checkpoint& ck, const std::string& name, int64_t r0, int64_t r1,
                             int64_t width) {
  std::vector<float> out(static_cast<size_t>((r1 - r0) * width));
  ck.read_rows(name, r0, r1, out.data());
  return out;
}

// Rows [r0, r1) of a [*, width] tensor into dst, in chunks so that large tensors (lm_head) never
// sit whole in host memory.
void load_rows_bf16(const Checkpoint& ck, const std::string& name, int64_t r0, int64_t r1,
                    int64_t width, bf16_bits* dst) {
  const int64_t chunk = std::max<int64_t>(1, (int64_t{64} << 20) / std::max<int64_t>(width, 1) / 4);
  for (int64_t a = r0; a < r1; a += chunk) {
    const int64_t b = std::min(r1, a + chunk);
    upload_bf16(read_rows(ck, name, a, b, width), dst + (a - r0) * width);
  }
}

// Per local head: M_h = W_O,h^T W_O,h in fp32 (bf16 products, fp32 sums), made exactly symmetric
// and split into hi + lo bf16 (the head write norm kernel reads rows of M as its columns).
void make_gram(DeviceLayer& L, int64_t D, int64_t Hl, int64_t d, Blas& blas, cudaStream_t s) {
  const int64_t qw = Hl * d;
  // cudaMemcpy from pageable memory may return before its DMA lands, and the backend's stream does
  // not wait for the legacy stream: finish every upload before the Gram product reads W_O.
  CUDA_CHECK(cudaDeviceSynchronize());
  DeviceBuffer<float> m(static_cast<size_t>(Hl * d * d));
  L.gram_hi.reserve(static_cast<size_t>(Hl * d * d));
  L.gram_lo.reserve(static_cast<size_t>(Hl * d * d));
  blas.tn(d, d, D, {L.wo.get(), Dt::kBF16, qw, d}, {L.wo.get(), Dt::kBF16, qw, d},
          {m.get(), Dt::kF32, d, d * d}, 1.f, 0.f, static_cast<int>(Hl));
  k::gram_split(m.get(), Hl, static_cast<int>(d), L.gram_hi.get(), L.gram_lo.get(), s);
  CUDA_CHECK(cudaStreamSynchronize(s));  // m is freed on return
}

}  // namespace

DeviceModel load_device_model(const Checkpoint& ck, const ShardPlan& plan, bool with_lm_head,
                              Blas& blas, cudaStream_t s) {
  const ModelConfig& c = ck.config();
  const int64_t D = c.hidden_size, d = c.head_dim, Hl = plan.local_heads(),
                KVl = plan.local_kv_heads();
  const int64_t qw = Hl * d, kw = KVl * d;
  const uint64_t before = ck.weight_bytes_read();
  DeviceModel w;
  w.layers.resize(static_cast<size_t>(c.num_layers));
  for (int64_t l = 0; l < c.num_layers; ++l) {
    DeviceLayer& L = w.layers[static_cast<size_t>(l)];
    // The family table names every tensor (the cuda backend runs the pre-norm RMSNorm families
    // without biases, with per-head or no q/k norm: check_cuda_supports).
    auto name = [&](Role role) { return tensor_name(c, role, l, -1, &ck); };
    upload_f32(read_rows(ck, name(Role::kAttnNorm), 0, D, 1), L.input_norm);
    upload_f32(read_rows(ck, name(Role::kMlpNorm), 0, D, 1), L.post_norm);
    if (c.qk_norm == QkNormKind::kPerHead) {
      upload_f32(read_rows(ck, name(Role::kQNorm), 0, d, 1), L.q_norm);
      upload_f32(read_rows(ck, name(Role::kKNorm), 0, d, 1), L.k_norm);
    }
    L.wqkv.reserve(static_cast<size_t>((qw + 2 * kw) * D));
    load_rows_bf16(ck, name(Role::kQ), plan.head_begin * d, plan.head_end * d, D,
                   L.wqkv.get());
    load_rows_bf16(ck, name(Role::kK), plan.kv_begin * d, plan.kv_end * d, D,
                   L.wqkv.get() + qw * D);
    load_rows_bf16(ck, name(Role::kV), plan.kv_begin * d, plan.kv_end * d, D,
                   L.wqkv.get() + (qw + kw) * D);
    {
      std::vector<float> o(static_cast<size_t>(D * qw));
      ck.read_cols(name(Role::kO), plan.head_begin * d, plan.head_end * d, o.data());
      L.wo.reserve(o.size());
      upload_bf16(o, L.wo.get());
    }
    make_gram(L, D, Hl, d, blas, s);
    L.moe = c.is_moe_layer(l);
    if (L.moe) {
      const int64_t I = c.moe_intermediate_size, El = plan.local_experts();
      L.inter = I;
      upload_f32(read_rows(ck, name(Role::kRouter), 0, c.num_experts, D), L.router);
      L.w_gate_up.reserve(static_cast<size_t>(El * 2 * I * D));
      L.w_down.reserve(static_cast<size_t>(El * D * I));
      for (int64_t e = plan.expert_begin; e < plan.expert_end; ++e) {
        const ExpertLocation loc = expert_location(ck, l, e);
        bf16_bits* gu = L.w_gate_up.get() + (e - plan.expert_begin) * 2 * I * D;
        load_rows_bf16(ck, loc.gate.tensor, loc.gate.row_begin, loc.gate.row_end, D, gu);
        load_rows_bf16(ck, loc.up.tensor, loc.up.row_begin, loc.up.row_end, D, gu + I * D);
        load_rows_bf16(ck, loc.down.tensor, loc.down.row_begin, loc.down.row_end, I,
                       L.w_down.get() + (e - plan.expert_begin) * D * I);
      }
    } else {
      const int64_t I = c.intermediate_size;
      L.inter = I;
      L.w_gate_up.reserve(static_cast<size_t>(2 * I * D));
      L.w_down.reserve(static_cast<size_t>(D * I));
      load_rows_bf16(ck, name(Role::kMlpGate), 0, I, D, L.w_gate_up.get());
      load_rows_bf16(ck, name(Role::kMlpUp), 0, I, D, L.w_gate_up.get() + I * D);
      load_rows_bf16(ck, name(Role::kMlpDown), 0, D, I, L.w_down.get());
    }
  }
  upload_f32(read_rows(ck, tensor_name(c, Role::kFinalNorm), 0, D, 1), w.final_norm);
  if (with_lm_head) {
    w.lm_head.reserve(static_cast<size_t>(c.vocab_size * D));
    load_rows_bf16(ck, tensor_name(c, c.tie_word_embeddings ? Role::kEmbed : Role::kLmHead), 0,
                   c.vocab_size, D, w.lm_head.get());
  }
  w.bytes_loaded = ck.weight_bytes_read() - before;
  CUDA_CHECK(cudaDeviceSynchronize());  // every upload has landed before the stream reads it
  return w;
}

DeviceModel synthesize_device_model(const ModelConfig& c, const ShardPlan& plan, bool with_lm_head,
                                    uint64_t seed, Blas& blas, cudaStream_t s) {
  const int64_t D = c.hidden_size, d = c.head_dim, H = c.num_heads;
  const int64_t Hl = plan.local_heads(), KVl = plan.local_kv_heads(), qw = Hl * d, kw = KVl * d;
  DeviceModel w;
  uint64_t bytes = 0;
  auto tensor_id = [](int64_t layer, int64_t kind, int64_t expert) {
    return static_cast<uint64_t>(((layer + 1) * 16 + kind) * 1000003 + expert);
  };
  // rows x cols block at (row0, col0) of a [*, global_cols] tensor, std 1/sqrt(fan_in).
  auto random_bf16 = [&](bf16_bits* dst, int64_t rows, int64_t cols, int64_t row0, int64_t col0,
                         int64_t global_cols, uint64_t id, int64_t fan_in) {
    k::fill_random_bf16(dst, rows, cols, row0, col0, global_cols, seed, id,
                        1.f / std::sqrt(static_cast<float>(fan_in)), s);
    bytes += static_cast<uint64_t>(rows * cols) * 2;
  };
  auto ones = [&](DeviceBuffer<float>& b, int64_t n) {
    b.reserve(static_cast<size_t>(n));
    k::fill(b.get(), n, 1.f, s);
  };
  w.layers.resize(static_cast<size_t>(c.num_layers));
  for (int64_t l = 0; l < c.num_layers; ++l) {
    DeviceLayer& L = w.layers[static_cast<size_t>(l)];
    ones(L.input_norm, D);
    ones(L.post_norm, D);
    ones(L.q_norm, d);
    ones(L.k_norm, d);
    L.wqkv.reserve(static_cast<size_t>((qw + 2 * kw) * D));
    random_bf16(L.wqkv.get(), qw, D, plan.head_begin * d, 0, D, tensor_id(l, 0, 0), D);
    random_bf16(L.wqkv.get() + qw * D, kw, D, plan.kv_begin * d, 0, D, tensor_id(l, 1, 0), D);
    random_bf16(L.wqkv.get() + (qw + kw) * D, kw, D, plan.kv_begin * d, 0, D, tensor_id(l, 2, 0),
                D);
    L.wo.reserve(static_cast<size_t>(D * qw));
    random_bf16(L.wo.get(), D, qw, 0, plan.head_begin * d, H * d, tensor_id(l, 3, 0), H * d);
    make_gram(L, D, Hl, d, blas, s);
    L.moe = c.is_moe_layer(l);
    if (L.moe) {
      const int64_t I = c.moe_intermediate_size, E = c.num_experts, El = plan.local_experts();
      L.inter = I;
      L.router.reserve(static_cast<size_t>(E * D));
      k::fill_random_f32(L.router.get(), E, D, 0, 0, D, seed, tensor_id(l, 4, 0),
                         1.f / std::sqrt(static_cast<float>(D)), s);
      L.w_gate_up.reserve(static_cast<size_t>(El * 2 * I * D));
      L.w_down.reserve(static_cast<size_t>(El * D * I));
      for (int64_t e = 0; e < El; ++e) {
        const int64_t ge = plan.expert_begin + e;
        random_bf16(L.w_gate_up.get() + e * 2 * I * D, 2 * I, D, 0, 0, D, tensor_id(l, 5, ge), D);
        random_bf16(L.w_down.get() + e * D * I, D, I, 0, 0, I, tensor_id(l, 6, ge), I);
      }
    } else {
      const int64_t I = c.intermediate_size;
      L.inter = I;
      L.w_gate_up.reserve(static_cast<size_t>(2 * I * D));
      L.w_down.reserve(static_cast<size_t>(D * I));
      random_bf16(L.w_gate_up.get(), 2 * I, D, 0, 0, D, tensor_id(l, 7, 0), D);
      random_bf16(L.w_down.get(), D, I, 0, 0, I, tensor_id(l, 8, 0), I);
    }
  }
  ones(w.final_norm, D);
  w.embed.reserve(static_cast<size_t>(c.vocab_size * D));
  k::fill_random_bf16(w.embed.get(), c.vocab_size, D, 0, 0, D, seed, tensor_id(-1, 9, 0), 1.f, s);
  bytes += static_cast<uint64_t>(c.vocab_size * D) * 2;
  if (with_lm_head) {
    w.lm_head.reserve(static_cast<size_t>(c.vocab_size * D));
    random_bf16(w.lm_head.get(), c.vocab_size, D, 0, 0, D, tensor_id(-1, 10, 0), D);
  }
  CUDA_CHECK(cudaDeviceSynchronize());
  w.bytes_loaded = bytes;
  return w;
}

}  // namespace sinkscope::cuda
