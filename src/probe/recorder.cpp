// Recorder (rank-local sums of what a rank owns) and Reducer (rank 0 assembly).
#include "sinkscope/recorder.hpp"

#include <algorithm>
#include <boost/archive/binary_iarchive.hpp>
#include <boost/archive/binary_oarchive.hpp>
#include <boost/serialization/vector.hpp>
#include <boost/serialization/version.hpp>
#include <cmath>
#include <sstream>

#include "sinkscope/error.hpp"

BOOST_CLASS_VERSION(sinkscope::RankRecord, 4)

namespace sinkscope {

std::string serialize_record(const RankRecord& r) {
  std::ostringstream os;
  {
    boost::archive::binary_oarchive ar(os);
    ar << r;
  }
  return os.str();
}

RankRecord deserialize_record(const std::string& bytes) {
  RankRecord r;
  try {
    std::istringstream is(bytes);
    boost::archive::binary_iarchive ar(is);
    ar >> r;
  } catch (const std::exception& e) {
    throw RuntimeFailure(std::string("cannot decode a rank record: ") + e.what());
  }
  return r;
}

Recorder::Recorder(const ModelConfig& cfg, const ShardPlan& plan, int64_t seq_len, bool per_query)
    : cfg_(cfg), plan_(plan), per_query_(per_query), records_rows_(plan.tp_rank == 0) {
  rec_.has_rows = records_rows_;
  const int64_t L = cfg.num_layers, H = cfg.num_heads, E = std::max<int64_t>(cfg.num_experts, 1);
  const ComponentLayout ci(cfg);
  rec_.L = L;
  rec_.H = H;
  rec_.E = cfg.num_experts;
  rec_.T = seq_len;
  rec_.D = cfg.hidden_size;
  rec_.C = ci.count_before(L);
  rec_.sink_sum.assign(L * H, 0);
  rec_.head_p0_sum.assign(L * H, 0);
  rec_.head_rest_sum.assign(L * H, 0);
  rec_.head_begin = plan.head_begin;
  rec_.head_count = plan.local_heads();
  rec_.attr_sum.assign(static_cast<size_t>(L * rec_.head_count * rec_.C), 0);
  rec_.unit_p0_sum.assign(static_cast<size_t>((L + 1) * cfg.hidden_size), 0);
  rec_.massive_p0.assign(L + 1, 0);
  rec_.moe_p0_sum.assign(L, 0);
  rec_.moe_rest_sum.assign(L, 0);
  rec_.expert_p0_sum.assign(L * E, 0);
  rec_.p0_routed.assign(L * E, 0);
  rec_.rest_routed.assign(L * E, 0);
  if (cfg.learned_sinks) rec_.learned_sink_sum.assign(L * H, 0);
}

int64_t Recorder::row_of(int64_t probe) {
  auto it = std::find(rec_.probe_ids.begin(), rec_.probe_ids.end(), probe);
  if (it != rec_.probe_ids.end()) return it - rec_.probe_ids.begin();
  const int64_t L1 = rec_.L + 1;
  rec_.probe_ids.push_back(probe);
  rec_.norm_p0.resize(rec_.probe_ids.size() * L1, 0.f);
  rec_.norm_rest_median.resize(rec_.probe_ids.size() * L1, 0.f);
  if (per_query_) rec_.p0_per_query.resize(rec_.probe_ids.size() * rec_.L * rec_.H * rec_.T, 0.f);
  if (per_query_ && cfg_.learned_sinks)
    rec_.sink_mass_per_query.resize(rec_.p0_per_query.size(), 0.f);
  return static_cast<int64_t>(rec_.probe_ids.size()) - 1;
}

int64_t Recorder::own_row_of(int64_t probe) {
  auto it = std::find(rec_.own_probe_ids.begin(), rec_.own_probe_ids.end(), probe);
  if (it != rec_.own_probe_ids.end()) return it - rec_.own_probe_ids.begin();
  rec_.own_probe_ids.push_back(probe);
  const size_t rows = rec_.own_probe_ids.size(), L = static_cast<size_t>(rec_.L),
               Hl = static_cast<size_t>(rec_.head_count);
  rec_.sink_rows.resize(rows * L * Hl, 0.f);
  rec_.attr_layer_rows.resize(rows * L * Hl * (L + 1), 0.f);
  return static_cast<int64_t>(rows) - 1;
}

void Recorder::on_residual(const ResidualTap& t) {
  if (!records_rows_) return;
  const int64_t L1 = rec_.L + 1, D = t.D;
  for (int64_t b = 0; b < t.B; ++b) {
    const int64_t row = row_of(t.probe0 + b);
    rec_.norm_p0[row * L1 + t.index] = t.norm_p0[b];
    rec_.norm_rest_median[row * L1 + t.index] = t.norm_rest_median[b];
    const float* x0 = t.x0 + b * D;
    if (t.norm_p0[b] > 0)
      for (int64_t c = 0; c < D; ++c) rec_.unit_p0_sum[t.index * D + c] += x0[c] / t.norm_p0[b];
    if (t.probe0 + b == 0) {  // Sun et al.: |x| > 100 and > 1000 x median |x|, on probe 0
      rec_.has_probe0 = true;
      int32_t count = 0;
      for (int64_t c = 0; c < D; ++c) {
        const double m = std::fabs(x0[c]);
        if (m > 100.0 && m > 1000.0 * t.abs_median[b]) ++count;
      }
      rec_.massive_p0[t.index] = count;
    }
  }
}

void Recorder::on_attention(const AttentionTap& t) {
  const int64_t H = rec_.H, l = t.layer, L1 = rec_.L + 1;
  const int64_t stride = ComponentLayout(cfg_).stride();
  for (int64_t b = 0; b < t.B; ++b) {
    const int64_t row = per_query_ ? row_of(t.probe0 + b) : 0;
    const int64_t own = own_row_of(t.probe0 + b);
    for (int64_t h = 0; h < t.local_heads; ++h) {
      const int64_t gh = t.head_begin + h, bh = b * t.local_heads + h;
      const int64_t lh = (own * rec_.L + l) * rec_.head_count + (gh - rec_.head_begin);
      rec_.sink_sum[l * H + gh] += t.a0_mean[bh];
      rec_.sink_rows[static_cast<size_t>(lh)] = t.a0_mean[bh];
      float* by_layer = rec_.attr_layer_rows.data() + lh * L1;
      for (int64_t c = 0; c < t.num_sources; ++c)
        by_layer[c == 0 ? 0 : 1 + (c - 1) / stride] += t.attr[bh * t.num_sources + c];
      rec_.head_p0_sum[l * H + gh] += t.write_p0_norm[bh];
      rec_.head_rest_sum[l * H + gh] += t.write_rest_norm[bh];
      double* dst = rec_.attr_sum.data() + (l * rec_.head_count + h) * rec_.C;
      const float* src = t.attr + bh * t.num_sources;
      for (int64_t c = 0; c < t.num_sources; ++c) dst[c] += src[c];
      if (per_query_)
        std::copy_n(t.a0 + bh * t.T, t.T,
                    rec_.p0_per_query.data() + ((row * rec_.L + l) * H + gh) * rec_.T);
      if (t.sink_mass_mean && !rec_.learned_sink_sum.empty()) {
        rec_.learned_sink_sum[l * H + gh] += t.sink_mass_mean[bh];
        if (per_query_)
          std::copy_n(t.sink_mass + bh * t.T, t.T,
                      rec_.sink_mass_per_query.data() + ((row * rec_.L + l) * H + gh) * rec_.T);
      }
    }
    for (int64_t g = 0; g < t.local_kv_heads; ++g) {
      const float* km = t.k0_model + (b * t.local_kv_heads + g) * t.head_dim;
      const float* ks = t.k0_from_components + (b * t.local_kv_heads + g) * t.head_dim;
      double diff = 0, norm = 0;
      for (int64_t j = 0; j < t.head_dim; ++j) {
        diff += (km[j] - ks[j]) * static_cast<double>(km[j] - ks[j]);
        norm += static_cast<double>(km[j]) * km[j];
      }
      rec_.identity_max_rel_err =
          std::max(rec_.identity_max_rel_err, std::sqrt(diff / std::max(norm, 1e-30)));
    }
  }
}

void Recorder::on_mlp(const MlpTap& t) {
  if (!records_rows_) return;
  const int64_t l = t.layer, E = std::max<int64_t>(rec_.E, 1);
  for (int64_t b = 0; b < t.B; ++b) {
    rec_.moe_p0_sum[l] += t.out_p0_norm[b];
    rec_.moe_rest_sum[l] += t.out_rest_norm[b];
    if (!t.moe) continue;
    for (int64_t e = 0; e < t.num_experts; ++e) {
      rec_.expert_p0_sum[l * E + e] += t.expert_p0_norm[b * t.num_experts + e];
      rec_.p0_routed[l * E + e] += t.p0_routed[b * t.num_experts + e];
    }
  }
  if (t.moe)
    for (int64_t e = 0; e < t.num_experts; ++e) rec_.rest_routed[l * E + e] += t.rest_routed[e];
}

FloatArray& Analysis::attr_of(ComponentKind kind) {
  switch (kind) {
    case ComponentKind::kEmbedding:
      return attr_embed;
    case ComponentKind::kHead:
      return attr_head;
    case ComponentKind::kExpert:
      return attr_expert;
    case ComponentKind::kMlp:
      return attr_mlp;
    case ComponentKind::kSharedExpert:
      return attr_shared_expert;
  }
  throw RuntimeFailure("unknown component kind " + std::to_string(static_cast<int>(kind)));
}

const FloatArray& Analysis::attr_of(ComponentKind kind) const {
  return const_cast<Analysis*>(this)->attr_of(kind);
}

void reduce_learned_sinks(const std::vector<RankRecord>& records, bool per_query, Analysis& a);

void reduce_records(const std::vector<RankRecord>& records, const ModelConfig& cfg, double eps,
                    bool per_query, Analysis& a, double* identity_max_rel_err) {
  if (records.empty()) throw RuntimeFailure("no rank records to reduce");
  const RankRecord& r0 = records.front();
  const size_t L = static_cast<size_t>(r0.L), H = static_cast<size_t>(r0.H),
               T = static_cast<size_t>(r0.T), D = static_cast<size_t>(r0.D),
               C = static_cast<size_t>(r0.C);
  const size_t E = static_cast<size_t>(cfg.num_experts), Es = std::max<size_t>(E, 1);
  const size_t N = static_cast<size_t>(a.meta.num_probes);
  const ComponentLayout ci(cfg);
  if (static_cast<int64_t>(C) != ci.count_before(cfg.num_layers))
    throw RuntimeFailure("rank records have " + std::to_string(C) + " component slots, the model " +
                         std::to_string(ci.count_before(cfg.num_layers)));

  std::vector<double> sink(L * H, 0), hp0(L * H, 0), hrest(L * H, 0), attr(L * H * C, 0),
      unit((L + 1) * D, 0);
  std::vector<double> mp0(L, 0), mrest(L, 0), ep0(L * Es, 0), r0c(L * Es, 0), rrc(L * Es, 0);
  a.norm_p0 = FloatArray({N, L + 1}, "probe,layer");
  a.norm_rest_median = FloatArray({N, L + 1}, "probe,layer");
  a.massive_p0 = IntArray({L + 1}, "layer");
  if (per_query) a.p0_per_query = FloatArray({N, L, H, T}, "probe,layer,head,query");
  std::vector<int> rows_seen(N, 0);
  double max_err = 0;
  for (const auto& r : records) {
    auto add = [](std::vector<double>& dst, const std::vector<double>& src) {
      for (size_t i = 0; i < src.size(); ++i) dst[i] += src[i];
    };
    add(sink, r.sink_sum);
    add(hp0, r.head_p0_sum);
    add(hrest, r.head_rest_sum);
    for (size_t l = 0; l < L; ++l)
      for (int64_t hl = 0; hl < r.head_count; ++hl) {
        const double* src = r.attr_sum.data() + (l * static_cast<size_t>(r.head_count) + hl) * C;
        double* dst = attr.data() + (l * H + static_cast<size_t>(r.head_begin + hl)) * C;
        for (size_t c = 0; c < C; ++c) dst[c] += src[c];
      }
    add(unit, r.unit_p0_sum);
    add(mp0, r.moe_p0_sum);
    add(mrest, r.moe_rest_sum);
    add(ep0, r.expert_p0_sum);
    add(r0c, r.p0_routed);
    add(rrc, r.rest_routed);
    max_err = std::max(max_err, r.identity_max_rel_err);
    if (r.has_probe0)
      std::copy(r.massive_p0.begin(), r.massive_p0.end(), a.massive_p0.data.begin());
    for (size_t row = 0; row < r.probe_ids.size(); ++row) {
      const size_t n = static_cast<size_t>(r.probe_ids[row]);
      if (n >= N)
        throw RuntimeFailure("a rank recorded probe " + std::to_string(n) + " of " +
                             std::to_string(N));
      if (r.has_rows) {
        std::copy_n(r.norm_p0.begin() + row * (L + 1), L + 1, a.norm_p0.data.begin() + n * (L + 1));
        std::copy_n(r.norm_rest_median.begin() + row * (L + 1), L + 1,
                    a.norm_rest_median.data.begin() + n * (L + 1));
        ++rows_seen[n];
      }
      if (per_query && !r.p0_per_query.empty())
        for (size_t i = 0; i < L * H * T; ++i)
          if (r.p0_per_query[row * L * H * T + i] != 0.f)
            a.p0_per_query.data[n * L * H * T + i] = r.p0_per_query[row * L * H * T + i];
    }
  }
  for (size_t n = 0; n < N; ++n)
    if (rows_seen[n] != 1)
      throw RuntimeFailure("probe " + std::to_string(n) + " was recorded " +
                           std::to_string(rows_seen[n]) + " times");
  if (identity_max_rel_err) *identity_max_rel_err = max_err;

  const double inv_n = 1.0 / static_cast<double>(N);
  a.sink_score = FloatArray({L, H}, "layer,head");
  a.attn_head_p0 = FloatArray({L, H}, "layer,head");
  a.attn_head_rest = FloatArray({L, H}, "layer,head");
  a.sink_rate = FloatArray({L}, "layer");
  double rate_sum = 0;
  for (size_t l = 0; l < L; ++l) {
    size_t over = 0;
    for (size_t h = 0; h < H; ++h) {
      a.sink_score.data[l * H + h] = static_cast<float>(sink[l * H + h] * inv_n);
      a.attn_head_p0.data[l * H + h] = static_cast<float>(hp0[l * H + h] * inv_n);
      a.attn_head_rest.data[l * H + h] = static_cast<float>(hrest[l * H + h] * inv_n);
      if (sink[l * H + h] * inv_n > eps) ++over;
    }
    a.sink_rate.data[l] = static_cast<float>(static_cast<double>(over) / static_cast<double>(H));
    rate_sum += a.sink_rate.data[l];
  }
  a.meta.sink_rate = rate_sum / static_cast<double>(L);
  if (cfg.learned_sinks) reduce_learned_sinks(records, per_query, a);

  a.h_ratio = FloatArray({L + 1}, "layer");
  a.p0_cosine = FloatArray({L + 1}, "layer");
  for (size_t l = 0; l <= L; ++l) {
    double ratio = 0;
    for (size_t n = 0; n < N; ++n)
      ratio += static_cast<double>(a.norm_p0.data[n * (L + 1) + l]) /
               a.norm_rest_median.data[n * (L + 1) + l];
    a.h_ratio.data[l] = static_cast<float>(ratio * inv_n);
    // Mean pairwise cosine from the sum of unit vectors: sum_{n != m} u_n.u_m = |sum u|^2 - N.
    double s2 = 0;
    for (size_t c = 0; c < D; ++c) s2 += unit[l * D + c] * unit[l * D + c];
    a.p0_cosine.data[l] = N < 2 ? std::nanf("")
                                : static_cast<float>((s2 - static_cast<double>(N)) /
                                                     (static_cast<double>(N) * (N - 1)));
  }

  a.moe_p0 = FloatArray({L}, "layer");
  a.moe_rest = FloatArray({L}, "layer");
  a.expert_p0 = FloatArray({L, E}, "layer,expert");
  a.p0_topk_freq = FloatArray({L, E}, "layer,expert");
  a.rest_topk_freq = FloatArray({L, E}, "layer,expert");
  const double rest_tokens = static_cast<double>(N) * static_cast<double>(T - 1);
  for (size_t l = 0; l < L; ++l) {
    a.moe_p0.data[l] = static_cast<float>(mp0[l] * inv_n);
    a.moe_rest.data[l] = static_cast<float>(mrest[l] * inv_n);
    for (size_t e = 0; e < E; ++e) {
      a.expert_p0.data[l * E + e] = static_cast<float>(ep0[l * Es + e] * inv_n);
      a.p0_topk_freq.data[l * E + e] = static_cast<float>(r0c[l * Es + e] * inv_n);
      a.rest_topk_freq.data[l * E + e] = static_cast<float>(rrc[l * Es + e] / rest_tokens);
    }
  }

  // Contract 1.2: per-probe alpha, and per probe the sink-weighted signed attribution of each
  // source index (weights: the sink scores of the whole probe set, as in layer_share).
  a.sink_score_per_probe = per_probe_sink(records, static_cast<int64_t>(N));
  a.attr_layer_per_probe = FloatArray({N, L + 1}, "probe,embedding_or_layer");
  for (const auto& r : records)
    for (size_t row = 0; row < r.own_probe_ids.size(); ++row) {
      const size_t n = static_cast<size_t>(r.own_probe_ids[row]),
                   Hl = static_cast<size_t>(r.head_count);
      for (size_t t = 0; t < L; ++t)
        for (size_t hl = 0; hl < Hl; ++hl) {
          const double alpha = sink[t * H + static_cast<size_t>(r.head_begin) + hl] * inv_n;
          const float* src = r.attr_layer_rows.data() + ((row * L + t) * Hl + hl) * (L + 1);
          for (size_t i = 0; i <= L; ++i)
            a.attr_layer_per_probe.data[n * (L + 1) + i] += static_cast<float>(alpha * src[i]);
        }
    }

  // One attribution dataset per component kind (sinkscope/components.hpp), filled from the
  // slots of the kind's components in every source layer before the target.
  for (const ComponentKindInfo& kind : component_kinds()) {
    FloatArray& out = a.attr_of(kind.kind);
    // A kind the model never has (a shared expert in most families) gets no dataset.
    bool present = !kind.per_layer;
    for (int64_t l = 0; l < cfg.num_layers && !present; ++l)
      present = component_count(cfg, kind.kind, l) > 0 || kind.kind == ComponentKind::kMlp ||
                kind.kind == ComponentKind::kExpert;
    if (!present) {
      out = FloatArray();
      continue;
    }
    const size_t width = static_cast<size_t>(component_width(cfg, kind.kind));
    if (!kind.per_layer)
      out = FloatArray({L, H}, "target_layer,target_head");
    else if (kind.indexed)
      out = FloatArray({L, H, L, width},
                       std::string("target_layer,target_head,source_layer,source_") +
                           (kind.kind == ComponentKind::kHead ? "head" : kind.name));
    else
      out = FloatArray({L, H, L}, "target_layer,target_head,source_layer");
    for (size_t t = 0; t < L; ++t)
      for (size_t h = 0; h < H; ++h) {
        const double* at = attr.data() + (t * H + h) * C;
        if (!kind.per_layer) {
          out.data[t * H + h] = static_cast<float>(at[ci.embed()] * inv_n);
          continue;
        }
        for (size_t l = 0; l < t; ++l) {
          const int64_t n = component_count(cfg, kind.kind, static_cast<int64_t>(l));
          for (int64_t i = 0; i < n; ++i) {
            const float v =
                static_cast<float>(at[ci.slot(kind.kind, static_cast<int64_t>(l), i)] * inv_n);
            if (kind.indexed)
              out.data[((t * H + h) * L + l) * width + static_cast<size_t>(i)] = v;
            else
              out.data[(t * H + h) * L + l] = v;
          }
        }
      }
  }
}

// Contract 1.3: the learned sink mass of every head (gpt-oss), averaged over probes and the sink
// queries like the sink score, and per query with --per-query.
void reduce_learned_sinks(const std::vector<RankRecord>& records, bool per_query, Analysis& a) {
  const size_t N = static_cast<size_t>(a.meta.num_probes),
               L = static_cast<size_t>(a.meta.num_layers),
               H = static_cast<size_t>(a.meta.num_heads), T = static_cast<size_t>(a.meta.seq_len);
  std::vector<double> sum(L * H, 0);
  for (const auto& r : records)
    for (size_t i = 0; i < r.learned_sink_sum.size() && i < sum.size(); ++i)
      sum[i] += r.learned_sink_sum[i];
  a.learned_sink_mass = FloatArray({L, H}, "layer,head");
  for (size_t i = 0; i < L * H; ++i)
    a.learned_sink_mass.data[i] = static_cast<float>(sum[i] / static_cast<double>(N));
  if (!per_query) return;
  a.learned_sink_mass_per_query = FloatArray({N, L, H, T}, "probe,layer,head,query");
  for (const auto& r : records)
    for (size_t row = 0; row < r.probe_ids.size(); ++row) {
      if (r.sink_mass_per_query.size() < (row + 1) * L * H * T) continue;
      const size_t n = static_cast<size_t>(r.probe_ids[row]);
      for (size_t i = 0; i < L * H * T; ++i)
        if (r.sink_mass_per_query[row * L * H * T + i] != 0.f)
          a.learned_sink_mass_per_query.data[n * L * H * T + i] =
              r.sink_mass_per_query[row * L * H * T + i];
    }
}

FloatArray per_probe_sink(const std::vector<RankRecord>& records, int64_t num_probes) {
  if (records.empty()) throw RuntimeFailure("no rank records to reduce");
  const size_t N = static_cast<size_t>(num_probes), L = static_cast<size_t>(records[0].L),
               H = static_cast<size_t>(records[0].H);
  FloatArray out({N, L, H}, "probe,layer,head");
  for (const auto& r : records)
    for (size_t row = 0; row < r.own_probe_ids.size(); ++row) {
      const size_t n = static_cast<size_t>(r.own_probe_ids[row]),
                   Hl = static_cast<size_t>(r.head_count);
      if (n >= N)
        throw RuntimeFailure("a rank recorded probe " + std::to_string(n) + " of " +
                             std::to_string(N));
      for (size_t l = 0; l < L; ++l)
        for (size_t hl = 0; hl < Hl; ++hl)
          out.data[(n * L + l) * H + static_cast<size_t>(r.head_begin) + hl] =
              r.sink_rows[(row * L + l) * Hl + hl];
    }
  return out;
}

double sink_weighted_drop(const FloatArray& alpha, const float* ablated) {
  double weight = 0, drop = 0;
  for (size_t i = 0; i < alpha.data.size(); ++i) {
    weight += alpha.data[i];
    drop += static_cast<double>(alpha.data[i]) * (alpha.data[i] - static_cast<double>(ablated[i]));
  }
  return weight > 0 ? drop / weight : 0.0;
}

namespace {
// Shares of positive parts, sum 1 (all zero when nothing is positive); first-two share and peak
// layer of docs/metrics.md section 5 applied to a [L+1] profile.
void positive_shares(const std::vector<double>& v, FloatArray* share, float* first2,
                     int32_t* peak) {
  const size_t n = v.size();
  double total = 0;
  for (double x : v) total += std::max(0.0, x);
  *share = FloatArray({n}, "embedding_or_layer");
  for (size_t i = 0; i < n; ++i)
    share->data[i] = total > 0 ? static_cast<float>(std::max(0.0, v[i]) / total) : 0.f;
  *first2 = (n >= 2 ? share->data[1] : 0.f) + (n >= 3 ? share->data[2] : 0.f);
  *peak = 0;
  for (size_t l = 1; l + 1 < n; ++l)
    if (share->data[1 + l] > share->data[1 + static_cast<size_t>(*peak)])
      *peak = static_cast<int32_t>(l);
}
}  // namespace

void compute_causal_profile(Analysis& a) {
  positive_shares(std::vector<double>(a.causal_drop.data.begin(), a.causal_drop.data.end()),
                  &a.causal_layer_share, &a.causal_first2_share, &a.causal_peak_layer);
}

void compute_profile(Analysis& a) {
  const size_t L = a.sink_score.shape.at(0), H = a.sink_score.shape.at(1);
  // share(l): the sink-weighted positive attributions of every component of layer l (index 0:
  // the embedding), summed over the kinds of components.
  std::vector<double> share(L + 1, 0);
  for (const ComponentKindInfo& kind : component_kinds()) {
    const FloatArray& attr = a.attr_of(kind.kind);
    if (attr.data.empty()) continue;
    const size_t width = kind.indexed ? attr.shape.at(3) : 1;
    for (size_t t = 0; t < L; ++t)
      for (size_t h = 0; h < H; ++h) {
        const double alpha = a.sink_score.at(t, h);
        if (!kind.per_layer) {
          share[0] += alpha * std::max(0.f, attr.data[t * H + h]);
          continue;
        }
        for (size_t l = 0; l < t; ++l) {
          const float* v = attr.data.data() + ((t * H + h) * L + l) * width;
          double s = 0;
          for (size_t i = 0; i < width; ++i) s += std::max(0.f, v[i]);
          share[1 + l] += alpha * s;
        }
      }
  }
  double total = 0;
  for (double s : share) total += s;
  a.layer_share = FloatArray({L + 1}, "layer_index");
  for (size_t i = 0; i <= L; ++i)
    a.layer_share.data[i] = total > 0 ? static_cast<float>(share[i] / total) : 0.f;
  a.first2_share = (L >= 1 ? a.layer_share.data[1] : 0.f) + (L >= 2 ? a.layer_share.data[2] : 0.f);
  a.peak_layer = 0;
  for (size_t l = 1; l < L; ++l)
    if (a.layer_share.data[1 + l] > a.layer_share.data[1 + a.peak_layer])
      a.peak_layer = static_cast<int32_t>(l);
  double ent = 0;
  for (float p : a.layer_share.data)
    if (p > 0) ent -= p * std::log(static_cast<double>(p));
  a.entropy = static_cast<float>(ent);

  a.norm_gain_share = FloatArray({L}, "layer");
  std::vector<double> gain(L);
  double gsum = 0;
  for (size_t l = 0; l < L; ++l) {
    gain[l] = std::max(0.0, std::log(static_cast<double>(a.h_ratio.data[l + 1])) -
                                std::log(static_cast<double>(a.h_ratio.data[l])));
    if (!std::isfinite(gain[l])) gain[l] = 0;
    gsum += gain[l];
  }
  for (size_t l = 0; l < L; ++l)
    a.norm_gain_share.data[l] = gsum > 0 ? static_cast<float>(gain[l] / gsum) : 0.f;
}

void convergence(const std::vector<std::vector<float>>& shares, const std::vector<int64_t>& steps,
                 double tau, std::vector<float>* tv, int64_t* step) {
  tv->clear();
  for (size_t c = 1; c < shares.size(); ++c) {
    double d = 0;
    for (size_t i = 0; i < shares[c].size(); ++i)
      d += std::fabs(static_cast<double>(shares[c][i]) - shares[c - 1][i]);
    tv->push_back(static_cast<float>(0.5 * d));
  }
  // The first step s_c after which every later tv is <= tau: tv[j] compares c = j + 1 with j, so
  // "after s_c" means every tv[j] with j >= c is small. -1 when even the last tv is above tau.
  *step = -1;
  if (tv->empty()) return;
  int64_t c = static_cast<int64_t>(tv->size());  // candidate index into steps
  while (c > 0 && (*tv)[static_cast<size_t>(c - 1)] <= tau) --c;
  if (c < static_cast<int64_t>(tv->size())) *step = steps[static_cast<size_t>(c)];
}

}  // namespace sinkscope
