#include "cpu/weights.hpp"

#include <algorithm>

#include "checkpoint/mxfp4.hpp"
#include "sinkscope/checkpoint.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/family.hpp"

namespace sinkscope {
namespace {

// Bytes ahead of the current read that the kernel is asked to fetch (madvise WILLNEED).
constexpr uint64_t kReadAheadBytes = uint64_t{1} << 30;

// One read of the load, as planned: rows [r0, r1) (and, for a block, its byte count).
struct PlannedRead {
  std::string name;
  int64_t r0, r1;
  uint64_t bytes;
};

// Runs the load twice: first to list the reads (planning: nothing is read, results are empty),
// then to read them, advising the kernel of the next kReadAheadBytes before each read.
class Loader {
 public:
  Loader(const Checkpoint& ck, std::vector<PlannedRead>* plan)
      : ck_(ck), c_(ck.config()), plan_(plan) {}
  Loader(const Checkpoint& ck, const std::vector<PlannedRead>& planned)
      : ck_(ck), c_(ck.config()), planned_(&planned) {}

  WeightVector rows(Role role, int64_t l, int64_t r0, int64_t r1, int64_t width) const {
    return rows_of(tensor_name(c_, role, l, -1, &ck_), r0, r1, width);
  }
  WeightVector rows_of(const std::string& name, int64_t r0, int64_t r1, int64_t width) const {
    if (note(name, r0, r1, static_cast<uint64_t>((r1 - r0) * width))) return {};
    WeightVector out(static_cast<size_t>((r1 - r0) * width));
    ck_.read_rows(name, r0, r1, out.data());
    return out;
  }
  // The block rows [r0, r1) x columns [c0, c1) of a tensor's 2-D view.
  WeightVector block(const std::string& name, int64_t r0, int64_t r1, int64_t c0,
                     int64_t c1) const {
    if (note(name, r0, r1, static_cast<uint64_t>((r1 - r0) * (c1 - c0)))) return {};
    WeightVector out(static_cast<size_t>((r1 - r0) * (c1 - c0)));
    ck_.read_block(name, r0, r1, c0, c1, out.data());
    return out;
  }
  // A 1-D tensor's elements [b, e), or nothing where the family or config has no such tensor.
  WeightVector vec(Role role, int64_t l, int64_t b, int64_t e, bool present = true) const {
    if (!present || !has_role(c_, role)) return {};
    return rows(role, l, b, e, 1);
  }
  NormWeights norm(Role gain, Role bias, int64_t l) const {
    if (!has_role(c_, gain)) return {};
    const int64_t D = c_.hidden_size;
    return {vec(gain, l, 0, D), vec(bias, l, 0, D, c_.norm == NormKind::kLayer)};
  }
  // Column block [c0, c1) of every row of a 2-D tensor (o_proj's columns of this rank's heads).
  WeightVector cols(Role role, int64_t l, int64_t rows, int64_t c0, int64_t c1) const {
    return block(tensor_name(c_, role, l), 0, rows, c0, c1);
  }
  // Rows [r0, r1) of an MXFP4 tensor `X_blocks` decoded with its `X_scales`: [r1 - r0, 32 G],
  // a row being one output of the [..., out, G, 16] blocks.
  WeightVector mxfp4_rows(const std::string& blocks, int64_t r0, int64_t r1) const {
    const std::string scales = mxfp4_scales_name(blocks);
    const TensorInfo* st = ck_.find(scales);
    const int64_t G = st ? st->shape.back() : 0;
    const bool planning = note(blocks, r0 * G, r1 * G, static_cast<uint64_t>((r1 - r0) * G * 16));
    note(scales, r0, r1, static_cast<uint64_t>((r1 - r0) * G));
    if (planning) return {};
    const StoredSlice b = ck_.raw_rows(blocks, r0 * G, r1 * G), s = ck_.raw_rows(scales, r0, r1);
    WeightVector out(static_cast<size_t>((r1 - r0) * G * 32));
    const int64_t bad =
        decode_mxfp4(reinterpret_cast<const uint8_t*>(b.data),
                     reinterpret_cast<const uint8_t*>(s.data), r1 - r0, G, out.data());
    if (bad < (r1 - r0) * G)
      throw InputError(ck_.dir() + ": tensor '" + scales +
                       "' holds the e8m0 NaN scale (255) at row " + std::to_string(r0 + bad / G) +
                       ", block " + std::to_string(bad % G));
    return out;
  }
  // A gpt-oss expert's slice [i0, i1) of the intermediate dimension (docs/families.md): gate and
  // up de-interleaved from the columns (bf16: [E, D, 2I]) or rows (MXFP4: [E, 2I, D]) of gate_up,
  // down [D, i1 - i0] from [E, I, D] (bf16) or [E, D, I] (MXFP4), biases; down's bias on the
  // rank of slice 0 only.
  MlpWeights gpt_oss_expert(int64_t l, int64_t e, int64_t i0, int64_t i1) const {
    const int64_t D = c_.hidden_size, I = c_.moe_intermediate_size, n = i1 - i0;
    const std::string gu = tensor_name(c_, Role::kExpertsGateUp, l, -1, &ck_),
                      dn = tensor_name(c_, Role::kExpertsDown, l, -1, &ck_);
    MlpWeights m;
    m.inter = n;
    if (!plan_) {  // planning lists the reads only
      m.gate.resize(static_cast<size_t>(n * D));
      m.up.resize(static_cast<size_t>(n * D));
      m.down.resize(static_cast<size_t>(D * n));
    }
    if (is_mxfp4_blocks(gu)) {
      const auto rows = mxfp4_rows(gu, e * 2 * I + 2 * i0, e * 2 * I + 2 * i1);  // [2n, D]
      for (int64_t j = 0; !rows.empty() && j < n; ++j) {
        std::copy_n(rows.data() + (2 * j) * D, D, m.gate.data() + j * D);
        std::copy_n(rows.data() + (2 * j + 1) * D, D, m.up.data() + j * D);
      }
    } else {
      const auto cols = block(gu, e * D, (e + 1) * D, 2 * i0, 2 * i1);  // [D, 2n]
      for (int64_t r = 0; !cols.empty() && r < D; ++r)
        for (int64_t j = 0; j < n; ++j) {
          m.gate[j * D + r] = cols[r * 2 * n + 2 * j];
          m.up[j * D + r] = cols[r * 2 * n + 2 * j + 1];
        }
    }
    if (is_mxfp4_blocks(dn)) {
      const auto rows = mxfp4_rows(dn, e * D, (e + 1) * D);  // [D, I]
      for (int64_t r = 0; !rows.empty() && r < D; ++r)
        std::copy_n(rows.data() + r * I + i0, n, m.down.data() + r * n);
    } else {
      const auto rows = rows_of(dn, e * I + i0, e * I + i1, D);  // [n, D]
      for (int64_t j = 0; !rows.empty() && j < n; ++j)
        for (int64_t r = 0; r < D; ++r) m.down[r * n + j] = rows[j * D + r];
    }
    if (c_.expert_bias) {
      const auto b = block(tensor_name(c_, Role::kExpertsGateUpBias, l), e, e + 1, 2 * i0, 2 * i1);
      m.gate_bias.resize(b.empty() ? 0 : static_cast<size_t>(n));
      m.up_bias.resize(b.empty() ? 0 : static_cast<size_t>(n));
      for (int64_t j = 0; !b.empty() && j < n; ++j) {
        m.gate_bias[j] = b[2 * j];
        m.up_bias[j] = b[2 * j + 1];
      }
      if (i0 == 0) m.down_bias = rows(Role::kExpertsDownBias, l, e, e + 1, D);
    }
    return m;
  }
  MlpWeights dense_mlp(int64_t l) const {
    const int64_t D = c_.hidden_size, I = c_.intermediate_size;
    MlpWeights m;
    m.inter = I;
    if (c_.gated_mlp) m.gate = rows(Role::kMlpGate, l, 0, I, D);
    m.up = rows(Role::kMlpUp, l, 0, I, D);
    m.down = rows(Role::kMlpDown, l, 0, D, I);
    if (c_.gated_mlp) m.gate_bias = vec(Role::kMlpGateBias, l, 0, I, c_.mlp_bias);
    m.up_bias = vec(Role::kMlpUpBias, l, 0, I, c_.mlp_bias);
    m.down_bias = vec(Role::kMlpDownBias, l, 0, D, c_.mlp_bias);
    return m;
  }

 private:
  // Planning: records the read (element counts are turned into stored bytes) and returns true.
  // Reading: advises the kernel of the planned reads up to kReadAheadBytes ahead, returns false.
  bool note(const std::string& name, int64_t r0, int64_t r1, uint64_t elems) const {
    if (plan_) {
      const TensorInfo* t = ck_.find(name);
      plan_->push_back({name, r0, r1, elems * (t ? t->elem_size : 4)});
      return true;
    }
    const auto& p = *planned_;
    while (advised_ < p.size() && advised_bytes_ < done_bytes_ + kReadAheadBytes) {
      ck_.advise_rows(p[advised_].name, p[advised_].r0, p[advised_].r1);
      advised_bytes_ += p[advised_].bytes;
      ++advised_;
    }
    if (next_ < p.size()) done_bytes_ += p[next_++].bytes;
    return false;
  }

  const Checkpoint& ck_;
  const ModelConfig& c_;
  std::vector<PlannedRead>* plan_ = nullptr;
  const std::vector<PlannedRead>* planned_ = nullptr;
  mutable size_t advised_ = 0, next_ = 0;
  mutable uint64_t advised_bytes_ = 0, done_bytes_ = 0;
};

ModelWeights load_with(const Checkpoint& ck, const ShardPlan& plan, bool with_lm_head,
                       const Loader& ld) {
  const ModelConfig& c = ck.config();
  const int64_t D = c.hidden_size, d = c.head_dim, H = c.num_heads;
  const int64_t h0 = plan.head_begin, h1 = plan.head_end, g0 = plan.kv_begin, g1 = plan.kv_end;
  ModelWeights w;
  w.layers.resize(static_cast<size_t>(c.num_layers));
  for (int64_t l = 0; l < c.num_layers; ++l) {
    LayerWeights& L = w.layers[static_cast<size_t>(l)];
    L.attn_norm = ld.norm(Role::kAttnNorm, Role::kAttnNormBias, l);
    L.mlp_norm = ld.norm(Role::kMlpNorm, Role::kMlpNormBias, l);
    L.attn_out_norm = ld.norm(Role::kAttnOutNorm, Role::kCount, l);
    L.mlp_out_norm = ld.norm(Role::kMlpOutNorm, Role::kCount, l);
    if (c.mla()) {
      const int64_t Rq = c.mla_q_rank, Rkv = c.mla_kv_rank, dkv = c.qk_nope_dim + c.v_head_dim;
      if (Rq > 0) {
        L.mla.q_a = ld.rows(Role::kQA, l, 0, Rq, D);
        L.mla.q_a_norm = ld.vec(Role::kQANorm, l, 0, Rq);
        L.mla.q_b = ld.rows(Role::kQB, l, h0 * d, h1 * d, Rq);
      } else {
        L.q = ld.rows(Role::kQ, l, h0 * d, h1 * d, D);
      }
      L.mla.kv_a = ld.rows(Role::kKvA, l, 0, Rkv + c.qk_rope_dim, D);
      L.mla.kv_a_norm = ld.vec(Role::kKvANorm, l, 0, Rkv);
      L.mla.kv_b = ld.rows(Role::kKvB, l, h0 * dkv, h1 * dkv, Rkv);
    } else if (has_role(c, Role::kQkv)) {
      // GPT-NeoX: rows of query_key_value are [H, 3, d] (per head: q, k, v); no GQA.
      const std::string name = tensor_name(c, Role::kQkv, l);
      for (int64_t h = h0; h < h1; ++h) {
        auto part = [&](int64_t which, WeightVector& dst) {
          auto r = ld.rows_of(name, (3 * h + which) * d, (3 * h + which + 1) * d, D);
          dst.insert(dst.end(), r.begin(), r.end());
        };
        part(0, L.q);
        part(1, L.k);
        part(2, L.v);
        if (c.qkv_bias) {
          const std::string bname = tensor_name(c, Role::kQkvBias, l);
          auto bias = [&](int64_t which, WeightVector& dst) {
            auto r = ld.rows_of(bname, (3 * h + which) * d, (3 * h + which + 1) * d, 1);
            dst.insert(dst.end(), r.begin(), r.end());
          };
          bias(0, L.q_bias);
          bias(1, L.k_bias);
          bias(2, L.v_bias);
        }
      }
    } else {
      L.q = ld.rows(Role::kQ, l, h0 * d, h1 * d, D);
      L.k = ld.rows(Role::kK, l, g0 * d, g1 * d, D);
      L.v = ld.rows(Role::kV, l, g0 * d, g1 * d, D);
      L.q_bias = ld.vec(Role::kQBias, l, h0 * d, h1 * d, c.qkv_bias);
      L.k_bias = ld.vec(Role::kKBias, l, g0 * d, g1 * d, c.qkv_bias);
      L.v_bias = ld.vec(Role::kVBias, l, g0 * d, g1 * d, c.qkv_bias);
    }
    L.o = ld.cols(Role::kO, l, D, h0 * c.value_dim(), h1 * c.value_dim());
    L.o_bias = ld.vec(Role::kOBias, l, 0, D, c.o_bias);
    if (c.qk_norm == QkNormKind::kPerHead) {
      L.q_norm = ld.vec(Role::kQNorm, l, 0, d);
      L.k_norm = ld.vec(Role::kKNorm, l, 0, d);
    } else if (c.qk_norm == QkNormKind::kFullWidth) {
      L.q_norm = ld.vec(Role::kQNorm, l, h0 * d, h1 * d);
      L.k_norm = ld.vec(Role::kKNorm, l, g0 * d, g1 * d);
    }
    (void)H;
    if (c.learned_sinks) L.sinks = ld.vec(Role::kSinks, l, h0, h1);
    L.moe = c.is_moe_layer(l);
    if (L.moe && c.family->gpt_oss_layout) {
      L.router = ld.rows(Role::kRouter, l, 0, c.num_experts, D);
      L.router_bias = ld.vec(Role::kRouterBias, l, 0, c.num_experts, c.router_bias);
      for (int64_t e = plan.expert_begin; e < plan.expert_end; ++e)
        L.experts.push_back(ld.gpt_oss_expert(l, e, plan.inter_begin, plan.inter_end));
    } else if (L.moe) {
      L.router = ld.rows(Role::kRouter, l, 0, c.num_experts, D);
      if (c.router == RouterKind::kSigmoidGroupTopK)
        L.score_bias = ld.vec(Role::kRouterScoreBias, l, 0, c.num_experts);
      for (int64_t e = plan.expert_begin; e < plan.expert_end; ++e) {
        // Expert tensor parallelism: this rank's rows [inter_begin, inter_end) of gate/up and the
        // same columns of down (the SwiGLU is element-wise over the intermediate dimension).
        const ExpertLocation loc = expert_location(ck, l, e);
        const int64_t i0 = plan.inter_begin, i1 = plan.inter_end;
        MlpWeights m;
        m.inter = i1 - i0;
        m.gate = ld.rows_of(loc.gate.tensor, loc.gate.row_begin + i0, loc.gate.row_begin + i1, D);
        m.up = ld.rows_of(loc.up.tensor, loc.up.row_begin + i0, loc.up.row_begin + i1, D);
        m.down = ld.block(loc.down.tensor, loc.down.row_begin, loc.down.row_end, i0, i1);
        L.experts.push_back(std::move(m));
      }
      if (c.has_shared_expert()) {
        const int64_t S = c.shared_expert_intermediate_size;
        L.shared.inter = S;
        L.shared.gate = ld.rows(Role::kSharedGate, l, 0, S, D);
        L.shared.up = ld.rows(Role::kSharedUp, l, 0, S, D);
        L.shared.down = ld.rows(Role::kSharedDown, l, 0, D, S);
        if (c.shared_expert_gated) L.shared_gate = ld.rows(Role::kSharedExpertGate, l, 0, 1, D);
      }
    } else {
      L.dense = ld.dense_mlp(l);
    }
  }
  w.final_norm = {ld.vec(Role::kFinalNorm, -1, 0, D),
                  ld.vec(Role::kFinalNormBias, -1, 0, D, c.norm == NormKind::kLayer)};
  if (with_lm_head)
    w.lm_head =
        ld.rows(c.tie_word_embeddings ? Role::kEmbed : Role::kLmHead, -1, 0, c.vocab_size, D);
  return w;
}

std::vector<PlannedRead> plan_reads(const Checkpoint& ck, const ShardPlan& plan,
                                    bool with_lm_head) {
  std::vector<PlannedRead> reads;
  load_with(ck, plan, with_lm_head, Loader(ck, &reads));
  return reads;
}

}  // namespace

uint64_t planned_load_bytes(const Checkpoint& ck, const ShardPlan& plan, bool with_lm_head) {
  uint64_t total = 0;
  for (const auto& r : plan_reads(ck, plan, with_lm_head)) total += r.bytes;
  return total;
}

ModelWeights load_weights(const Checkpoint& ck, const ShardPlan& plan, bool with_lm_head,
                          const std::function<void(uint64_t, uint64_t)>& progress) {
  const std::vector<PlannedRead> reads = plan_reads(ck, plan, with_lm_head);
  uint64_t total = 0;
  for (const auto& r : reads) total += r.bytes;
  const uint64_t before = ck.weight_bytes_read();
  if (progress) ck.set_read_observer([&](uint64_t done) { progress(done - before, total); });
  struct Reset {
    const Checkpoint& ck;
    ~Reset() { ck.set_read_observer({}); }
  } reset{ck};
  return load_with(ck, plan, with_lm_head, Loader(ck, reads));
}

MlpWeights load_gpt_oss_expert(const Checkpoint& ck, int64_t layer, int64_t expert) {
  const std::vector<PlannedRead> none;  // no read-ahead plan: the reads happen as they come
  return Loader(ck, none).gpt_oss_expert(layer, expert, 0, ck.config().moe_intermediate_size);
}

}  // namespace sinkscope
