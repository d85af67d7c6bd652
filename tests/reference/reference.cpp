// The float64 reference (see reference.hpp). Written from docs/metrics.md and the Hugging Face
// Qwen3-MoE modelling code, not from sinkscope's forward pass: one probe at a time, one token at a
// time, plain loops, every intermediate kept so each metric can be computed literally.
#include "reference.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>

#include "sinkscope/checkpoint.hpp"

namespace sinkscope::reference {
namespace {

using Vec = std::vector<double>;

// Row-major [rows, cols]; row r is output r of the linear map (the torch nn.Linear layout).
struct Matrix {
  int64_t rows = 0, cols = 0;
  Vec w;
  double at(int64_t r, int64_t c) const { return w[static_cast<size_t>(r * cols + c)]; }
};

struct Mlp {
  Matrix gate, up, down;  // gate/up [I, D], down [D, I]
};

struct Layer {
  Vec in_norm, post_norm, q_norm, k_norm;  // [D], [D], [d], [d]
  Matrix q, k, v, o;                       // [H d, D], [KV d, D], [KV d, D], [D, H d]
  bool moe = false;
  Matrix router;             // [E, D]
  std::vector<Mlp> experts;  // E
  Mlp dense;
};

// Rows [row_begin, row_end) of tensor `name` viewed as [prod(shape[:-1]), shape[-1]], widened to
// double.
Matrix read_matrix(const Checkpoint& ck, const std::string& name, int64_t row_begin,
                   int64_t row_end, int64_t cols) {
  const TensorInfo* ti = ck.find(name);
  if (!ti) throw std::runtime_error("reference: tensor '" + name + "' is missing");
  if (ti->shape.empty() || ti->shape.back() != cols)
    throw std::runtime_error("reference: tensor '" + name + "' does not have " +
                             std::to_string(cols) + " columns");
  std::vector<float> f(static_cast<size_t>((row_end - row_begin) * cols));
  ck.read_rows(name, row_begin, row_end, f.data());
  Matrix m;
  m.rows = row_end - row_begin;
  m.cols = cols;
  m.w.assign(f.begin(), f.end());  // float -> double is exact
  return m;
}

Matrix read_matrix(const Checkpoint& ck, const std::string& name, int64_t rows, int64_t cols) {
  const TensorInfo* ti = ck.find(name);
  if (!ti) throw std::runtime_error("reference: tensor '" + name + "' is missing");
  if (ti->shape.size() != 2 || ti->shape[0] != rows || ti->shape[1] != cols)
    throw std::runtime_error("reference: tensor '" + name + "' has an unexpected shape");
  return read_matrix(ck, name, 0, rows, cols);
}

Vec read_vector(const Checkpoint& ck, const std::string& name, int64_t n) {
  const TensorInfo* ti = ck.find(name);
  if (!ti || ti->shape.size() != 1 || ti->shape[0] != n)
    throw std::runtime_error("reference: vector '" + name + "' is missing or mis-shaped");
  std::vector<float> f(static_cast<size_t>(n));
  ck.read_rows(name, 0, n, f.data());
  return Vec(f.begin(), f.end());
}

// out[r] = sum_c W[row0 + r, c] v[c] for r < n.
Vec apply_rows(const Matrix& W, int64_t row0, int64_t n, const double* v) {
  Vec out(static_cast<size_t>(n), 0.0);
  for (int64_t r = 0; r < n; ++r) {
    double acc = 0;
    for (int64_t c = 0; c < W.cols; ++c) acc += W.at(row0 + r, c) * v[c];
    out[static_cast<size_t>(r)] = acc;
  }
  return out;
}
Vec apply(const Matrix& W, const double* v) { return apply_rows(W, 0, W.rows, v); }

// Root mean square with the norm's epsilon: sqrt(mean(x^2) + eps).
double rms(const double* x, int64_t n, double eps) {
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  return std::sqrt(ss / static_cast<double>(n) + eps);
}

// RMSNorm: gamma * x / rms(x).
Vec rms_norm(const double* x, int64_t n, const Vec& gamma, double eps) {
  const double r = rms(x, n, eps);
  Vec out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    out[static_cast<size_t>(i)] = gamma[static_cast<size_t>(i)] * (x[i] / r);
  return out;
}

// RoPE, rotate_half convention: out = x cos + rotate_half(x) sin with rotate_half(x) = (-x2, x1)
// and the angle of dimensions j and j + d/2 equal to pos * theta^(-2j/d).
Vec rope(const Vec& x, int64_t pos, double theta) {
  const int64_t d = static_cast<int64_t>(x.size()), half = d / 2;
  Vec out(x.size());
  for (int64_t j = 0; j < half; ++j) {
    const double inv_freq = std::pow(theta, -static_cast<double>(2 * j) / static_cast<double>(d));
    const double angle = static_cast<double>(pos) * inv_freq, c = std::cos(angle),
                 s = std::sin(angle);
    out[j] = x[j] * c - x[j + half] * s;
    out[j + half] = x[j + half] * c + x[j] * s;
  }
  return out;
}

double silu(double g) { return g / (1.0 + std::exp(-g)); }

// SwiGLU MLP: down(silu(gate u) * up u).
Vec run_mlp(const Mlp& m, const double* u) {
  const Vec g = apply(m.gate, u), up = apply(m.up, u);
  Vec h(g.size());
  for (size_t j = 0; j < g.size(); ++j) h[j] = silu(g[j]) * up[j];
  return apply(m.down, h.data());
}

double dot(const double* a, const double* b, int64_t n) {
  double acc = 0;
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

double norm2(const double* a, int64_t n) { return std::sqrt(dot(a, a, n)); }

double median(Vec v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  if (n == 0) return std::nan("");
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Mean over positions 1..T-1 of a [T, D] write.
Vec rest_mean(const Vec& w, int64_t T, int64_t D) {
  Vec m(static_cast<size_t>(D), 0.0);
  for (int64_t i = 1; i < T; ++i)
    for (int64_t c = 0; c < D; ++c) m[c] += w[i * D + c];
  for (auto& v : m) v /= static_cast<double>(T - 1);
  return m;
}

void mean_ablate_p0(Vec& w, int64_t T, int64_t D) {
  const Vec m = rest_mean(w, T, D);
  std::copy(m.begin(), m.end(), w.begin());
}

// Everything one probe's forward pass leaves behind.
struct Trace {
  std::vector<Vec> x;                  // [L+1] of [T, D]: the residual stream x_l
  Vec embed;                           // [T, D]: the embedding component's write (= x_0)
  std::vector<std::vector<Vec>> head;  // [L][H] of [T, D]: w^{l,h}
  std::vector<std::vector<Vec>> ffn;   // [L][S] of [T, D]: m^{l,e} (S = E) or the dense MLP (S = 1)
  std::vector<Vec> m;                  // [L] of [T, D]: m_l
  std::vector<std::vector<Vec>> a0;    // [L][H] of [T]: A^{l,h}[i, 0]
  Vec rx;                              // [L]: r_x of x_l[0]
  std::vector<Vec> rk;                 // [L][KV]: r_k of the pre-norm key at position 0
  std::vector<std::vector<Vec>> qbar;  // [L][H] of [d]
  std::vector<std::vector<Vec>> k0;    // [L][KV] of [d]: key at position 0 after k_norm
  std::vector<std::vector<std::vector<int>>> topk;  // [L][T]: routed experts (MoE layers)
  double min_gap = std::numeric_limits<double>::infinity();
  int64_t exact_ties = 0;
};

}  // namespace

struct ReferenceModel::Impl {
  ModelConfig c;
  Matrix embed;  // [V, D]
  std::vector<Layer> layers;

  bool ablated(const std::vector<Component>& ab, int32_t layer, int32_t kind, int32_t index) const {
    for (const auto& a : ab)
      if (a.layer == layer && a.kind == kind && a.index == index) return true;
    return false;
  }

  Trace forward(const int32_t* tok, int64_t T, const std::vector<Component>& ab) const;
  std::vector<Trace> forward_all(const IntArray& tokens, const std::vector<Component>& ab) const {
    const int64_t N = static_cast<int64_t>(tokens.shape.at(0)),
                  T = static_cast<int64_t>(tokens.shape.at(1));
    if (T < 2) throw std::runtime_error("reference: probes need at least 2 positions");
    std::vector<Trace> out;
    for (int64_t n = 0; n < N; ++n) out.push_back(forward(tokens.data.data() + n * T, T, ab));
    return out;
  }
};

Trace ReferenceModel::Impl::forward(const int32_t* tok, int64_t T,
                                    const std::vector<Component>& ab) const {
  const int64_t L = c.num_layers, H = c.num_heads, KV = c.num_kv_heads, d = c.head_dim,
                D = c.hidden_size;
  const int64_t group = H / KV, E = c.num_experts, K = c.top_k;
  const double eps = c.rms_norm_eps, inv_sqrt_d = 1.0 / std::sqrt(static_cast<double>(d));
  Trace tr;
  tr.embed.assign(static_cast<size_t>(T * D), 0.0);
  for (int64_t i = 0; i < T; ++i)
    for (int64_t j = 0; j < D; ++j) tr.embed[i * D + j] = embed.at(tok[i], j);
  if (ablated(ab, 0, Component::kEmbedding, 0)) mean_ablate_p0(tr.embed, T, D);
  tr.x.push_back(tr.embed);
  tr.head.resize(L);
  tr.ffn.resize(L);
  tr.m.resize(L);
  tr.a0.resize(L);
  tr.rx.resize(L);
  tr.rk.resize(L);
  tr.qbar.resize(L);
  tr.k0.resize(L);
  tr.topk.resize(L);

  for (int64_t l = 0; l < L; ++l) {
    const Layer& W = layers[l];
    const Vec& x = tr.x[l];
    // ---- attention
    std::vector<Vec> u(T);
    for (int64_t i = 0; i < T; ++i) u[i] = rms_norm(&x[i * D], D, W.in_norm, eps);
    tr.rx[l] = rms(&x[0], D, eps);
    std::vector<std::vector<Vec>> kr(T, std::vector<Vec>(KV)), vv(T, std::vector<Vec>(KV)),
        qr(T, std::vector<Vec>(H));
    tr.rk[l].assign(KV, 0.0);
    tr.k0[l].resize(KV);
    for (int64_t i = 0; i < T; ++i) {
      for (int64_t g = 0; g < KV; ++g) {
        const Vec kpre = apply_rows(W.k, g * d, d, u[i].data());
        const Vec kn = rms_norm(kpre.data(), d, W.k_norm, eps);
        if (i == 0) {
          tr.rk[l][g] = rms(kpre.data(), d, eps);
          tr.k0[l][g] = kn;
        }
        kr[i][g] = rope(kn, i, c.rope.theta);
        vv[i][g] = apply_rows(W.v, g * d, d, u[i].data());
      }
      for (int64_t h = 0; h < H; ++h) {
        const Vec qpre = apply_rows(W.q, h * d, d, u[i].data());
        qr[i][h] = rope(rms_norm(qpre.data(), d, W.q_norm, eps), i, c.rope.theta);
      }
    }
    tr.qbar[l].assign(H, Vec(d, 0.0));
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t i = 1; i < T; ++i)
        for (int64_t r = 0; r < d; ++r) tr.qbar[l][h][r] += qr[i][h][r];
      for (auto& v : tr.qbar[l][h]) v /= static_cast<double>(T - 1);
    }
    tr.head[l].assign(H, Vec(static_cast<size_t>(T * D), 0.0));
    tr.a0[l].assign(H, Vec(T, 0.0));
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / group;
      for (int64_t i = 0; i < T; ++i) {
        Vec s(i + 1);
        for (int64_t j = 0; j <= i; ++j)
          s[j] = dot(qr[i][h].data(), kr[j][g].data(), d) * inv_sqrt_d;
        const double mx = *std::max_element(s.begin(), s.end());
        double sum = 0;
        for (auto& v : s) sum += (v = std::exp(v - mx));
        for (auto& v : s) v /= sum;  // A^{l,h}[i, j], j <= i (causal)
        tr.a0[l][h][i] = s[0];
        Vec z(d, 0.0);
        for (int64_t j = 0; j <= i; ++j)
          for (int64_t r = 0; r < d; ++r) z[r] += s[j] * vv[j][g][r];
        // w^{l,h}[i] = W_O[:, h-block] z
        for (int64_t cc = 0; cc < D; ++cc) {
          double acc = 0;
          for (int64_t r = 0; r < d; ++r) acc += W.o.at(cc, h * d + r) * z[r];
          tr.head[l][h][i * D + cc] = acc;
        }
      }
      if (ablated(ab, static_cast<int32_t>(l), Component::kHead, static_cast<int32_t>(h)))
        mean_ablate_p0(tr.head[l][h], T, D);
    }
    Vec y = x;
    for (int64_t h = 0; h < H; ++h)
      for (size_t j = 0; j < y.size(); ++j) y[j] += tr.head[l][h][j];

    // ---- MoE block or dense MLP
    const int64_t S = W.moe ? E : 1;
    tr.ffn[l].assign(S, Vec(static_cast<size_t>(T * D), 0.0));
    tr.topk[l].assign(T, {});
    for (int64_t i = 0; i < T; ++i) {
      const Vec u2 = rms_norm(&y[i * D], D, W.post_norm, eps);
      if (W.moe) {
        const Vec logits = apply(W.router, u2.data());
        const double mx = *std::max_element(logits.begin(), logits.end());
        Vec p(E);
        double sum = 0;
        for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(logits[e] - mx));
        for (auto& v : p) v /= sum;
        std::vector<int> order(E);
        std::iota(order.begin(), order.end(), 0);
        // Largest probability first; equal probabilities keep the lower expert index first.
        std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b]; });
        // Near-tie diagnostic in logit units (log p_a - log p_b), which fp32 resolves to ~1e-6.
        if (K < E) {
          const double gap = logits[order[K - 1]] - logits[order[K]];
          if (gap == 0)
            ++tr.exact_ties;  // decided by the tie rule alone
          else
            tr.min_gap = std::min(tr.min_gap, gap);
        }
        double wsum = 0;
        for (int64_t j = 0; j < K; ++j) wsum += p[order[j]];
        for (int64_t j = 0; j < K; ++j) {
          const int e = order[j];
          const double weight = c.norm_topk_prob ? p[e] / wsum : p[e];
          const Vec out = run_mlp(W.experts[e], u2.data());
          for (int64_t cc = 0; cc < D; ++cc) tr.ffn[l][e][i * D + cc] = weight * out[cc];
          tr.topk[l][i].push_back(e);
        }
      } else {
        const Vec out = run_mlp(W.dense, u2.data());
        for (int64_t cc = 0; cc < D; ++cc) tr.ffn[l][0][i * D + cc] = out[cc];
      }
    }
    for (int64_t s = 0; s < S; ++s)
      if (ablated(ab, static_cast<int32_t>(l), W.moe ? Component::kExpert : Component::kMlp,
                  static_cast<int32_t>(s)))
        mean_ablate_p0(tr.ffn[l][s], T, D);
    tr.m[l].assign(static_cast<size_t>(T * D), 0.0);
    for (int64_t s = 0; s < S; ++s)
      for (size_t j = 0; j < tr.m[l].size(); ++j) tr.m[l][j] += tr.ffn[l][s][j];
    Vec xn = y;
    for (size_t j = 0; j < xn.size(); ++j) xn[j] += tr.m[l][j];
    tr.x.push_back(std::move(xn));
  }
  return tr;
}

ReferenceModel::ReferenceModel(const std::string& model_dir) : impl_(std::make_unique<Impl>()) {
  const Checkpoint ck = Checkpoint::open(model_dir);
  Impl& m = *impl_;
  m.c = ck.config();
  const ModelConfig& c = m.c;
  const int64_t D = c.hidden_size, d = c.head_dim, H = c.num_heads, KV = c.num_kv_heads;
  m.embed = read_matrix(ck, "model.embed_tokens.weight", c.vocab_size, D);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    Layer L;
    L.in_norm = read_vector(ck, p + "input_layernorm.weight", D);
    L.post_norm = read_vector(ck, p + "post_attention_layernorm.weight", D);
    L.q = read_matrix(ck, p + "self_attn.q_proj.weight", H * d, D);
    L.k = read_matrix(ck, p + "self_attn.k_proj.weight", KV * d, D);
    L.v = read_matrix(ck, p + "self_attn.v_proj.weight", KV * d, D);
    L.o = read_matrix(ck, p + "self_attn.o_proj.weight", D, H * d);
    L.q_norm = read_vector(ck, p + "self_attn.q_norm.weight", d);
    L.k_norm = read_vector(ck, p + "self_attn.k_norm.weight", d);
    L.moe = c.is_moe_layer(l);
    if (L.moe) {
      const int64_t E = c.num_experts, I = c.moe_intermediate_size;
      L.router = read_matrix(ck, p + "mlp.gate.weight", E, D);
      const bool fused = ck.find(p + "mlp.experts.gate_up_proj") != nullptr;
      for (int64_t e = 0; e < E; ++e) {
        Mlp x;
        if (fused) {  // gate_up_proj [E, 2I, D] (gate rows first), down_proj [E, D, I]
          x.gate = read_matrix(ck, p + "mlp.experts.gate_up_proj", e * 2 * I, e * 2 * I + I, D);
          x.up = read_matrix(ck, p + "mlp.experts.gate_up_proj", e * 2 * I + I, (e + 1) * 2 * I, D);
          x.down = read_matrix(ck, p + "mlp.experts.down_proj", e * D, (e + 1) * D, I);
        } else {
          const std::string q = p + "mlp.experts." + std::to_string(e) + ".";
          x.gate = read_matrix(ck, q + "gate_proj.weight", I, D);
          x.up = read_matrix(ck, q + "up_proj.weight", I, D);
          x.down = read_matrix(ck, q + "down_proj.weight", D, I);
        }
        L.experts.push_back(std::move(x));
      }
    } else {
      const int64_t I = c.intermediate_size;
      L.dense.gate = read_matrix(ck, p + "mlp.gate_proj.weight", I, D);
      L.dense.up = read_matrix(ck, p + "mlp.up_proj.weight", I, D);
      L.dense.down = read_matrix(ck, p + "mlp.down_proj.weight", D, I);
    }
    m.layers.push_back(std::move(L));
  }
}

ReferenceModel::~ReferenceModel() = default;
ReferenceModel::ReferenceModel(ReferenceModel&&) noexcept = default;
ReferenceModel& ReferenceModel::operator=(ReferenceModel&&) noexcept = default;

const ModelConfig& ReferenceModel::config() const { return impl_->c; }

std::vector<double> ReferenceModel::sink_scores(const IntArray& tokens,
                                                const std::vector<Component>& ablate) const {
  const ModelConfig& c = impl_->c;
  const int64_t L = c.num_layers, H = c.num_heads;
  const int64_t N = static_cast<int64_t>(tokens.shape.at(0)),
                T = static_cast<int64_t>(tokens.shape.at(1));
  std::vector<double> alpha(static_cast<size_t>(L * H), 0.0);
  for (const Trace& tr : impl_->forward_all(tokens, ablate))
    for (int64_t l = 0; l < L; ++l)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < T; ++i)
          alpha[l * H + h] += tr.a0[l][h][i] / static_cast<double>(N * T);
  return alpha;
}

std::vector<double> ReferenceModel::ablation_delta(const IntArray& tokens,
                                                   const Component& comp) const {
  const std::vector<double> clean = sink_scores(tokens, {}), ablated = sink_scores(tokens, {comp});
  std::vector<double> delta(clean.size());
  for (size_t i = 0; i < clean.size(); ++i) delta[i] = ablated[i] - clean[i];
  return delta;
}

std::vector<double> ReferenceModel::causal_drop(const IntArray& tokens, int part,
                                                std::vector<double>* per_probe) const {
  const ModelConfig& c = impl_->c;
  const int64_t L = c.num_layers, H = c.num_heads;
  const int64_t N = static_cast<int64_t>(tokens.shape.at(0)),
                T = static_cast<int64_t>(tokens.shape.at(1));
  // alpha of each probe [N][L * H]: the mean over queries of A[i, 0].
  auto per_probe_alpha = [&](const std::vector<Component>& ablate) {
    std::vector<std::vector<double>> out;
    for (const Trace& tr : impl_->forward_all(tokens, ablate)) {
      std::vector<double> a(static_cast<size_t>(L * H), 0.0);
      for (int64_t l = 0; l < L; ++l)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t i = 0; i < T; ++i) a[l * H + h] += tr.a0[l][h][i] / static_cast<double>(T);
      out.push_back(a);
    }
    return out;
  };
  const auto clean = per_probe_alpha({});
  std::vector<double> alpha(static_cast<size_t>(L * H), 0.0);
  for (const auto& a : clean)
    for (size_t i = 0; i < alpha.size(); ++i) alpha[i] += a[i] / static_cast<double>(N);
  double weight = 0;
  for (double a : alpha) weight += a;
  std::vector<double> drop(static_cast<size_t>(L + 1), 0.0);
  if (per_probe) per_probe->assign(static_cast<size_t>(N * (L + 1)), 0.0);
  for (int64_t index = 0; index <= L; ++index) {
    std::vector<Component> set;
    if (index == 0) {
      set.push_back({0, Component::kEmbedding, 0});
    } else {
      const int32_t l = static_cast<int32_t>(index - 1);
      if (part != 1)
        for (int32_t h = 0; h < H; ++h) set.push_back({l, Component::kHead, h});
      if (part != 0) {
        if (impl_->layers[static_cast<size_t>(l)].moe)
          for (int32_t e = 0; e < c.num_experts; ++e) set.push_back({l, Component::kExpert, e});
        else
          set.push_back({l, Component::kMlp, 0});
      }
    }
    const auto ablated = per_probe_alpha(set);
    for (int64_t n = 0; n < N; ++n) {
      double d = 0;
      for (size_t i = 0; i < alpha.size(); ++i)
        d += alpha[i] * (clean[static_cast<size_t>(n)][i] - ablated[static_cast<size_t>(n)][i]);
      d /= weight;
      drop[static_cast<size_t>(index)] += d / static_cast<double>(N);
      if (per_probe) (*per_probe)[static_cast<size_t>(n * (L + 1) + index)] = d;
    }
  }
  return drop;
}

ReferenceResult ReferenceModel::analyze(const IntArray& tokens, double eps) const {
  const ModelConfig& c = impl_->c;
  const int64_t L = c.num_layers, H = c.num_heads, KV = c.num_kv_heads, d = c.head_dim,
                D = c.hidden_size;
  const int64_t E = c.num_experts, group = H / KV;
  const int64_t N = static_cast<int64_t>(tokens.shape.at(0)),
                T = static_cast<int64_t>(tokens.shape.at(1));
  const double dN = static_cast<double>(N), inv_sqrt_d = 1.0 / std::sqrt(static_cast<double>(d));
  const std::vector<Trace> traces = impl_->forward_all(tokens, {});
  const auto uL = static_cast<size_t>(L), uH = static_cast<size_t>(H), uE = static_cast<size_t>(E),
             uN = static_cast<size_t>(N), uT = static_cast<size_t>(T);

  ReferenceResult R;
  Analysis& a = R.analysis;
  a.meta.model_type = c.model_type;
  a.meta.num_layers = L;
  a.meta.num_heads = H;
  a.meta.num_kv_heads = KV;
  a.meta.head_dim = d;
  a.meta.num_experts = E;
  a.meta.top_k = c.top_k;
  a.meta.hidden_size = D;
  a.meta.num_probes = N;
  a.meta.seq_len = T;
  a.meta.eps = eps;
  a.tokens = tokens;
  for (const Trace& tr : traces) {
    R.min_routing_gap = std::min(R.min_routing_gap, tr.min_gap);
    R.exact_routing_ties += tr.exact_ties;
  }

  // ---- section 1: attention to position zero
  a.p0_per_query = FloatArray({uN, uL, uH, uT}, "probe,layer,head,query");
  R.sink_score.assign(uL * uH, 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t l = 0; l < L; ++l)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < T; ++i) {
          const double v = traces[n].a0[l][h][i];
          a.p0_per_query.at(n, l, h, i) = static_cast<float>(v);
          R.sink_score[l * H + h] += v / (dN * static_cast<double>(T));
        }
  a.sink_score = FloatArray({uL, uH}, "layer,head");
  a.sink_rate = FloatArray({uL}, "layer");
  double rate_sum = 0;
  for (int64_t l = 0; l < L; ++l) {
    int64_t over = 0;
    for (int64_t h = 0; h < H; ++h) {
      const double s = R.sink_score[l * H + h];
      a.sink_score.at(l, h) = static_cast<float>(s);
      if (s > eps) ++over;
      R.min_sink_eps_gap = std::min(R.min_sink_eps_gap, std::fabs(s - eps));
    }
    const double rate = static_cast<double>(over) / static_cast<double>(H);
    a.sink_rate.at(l) = static_cast<float>(rate);
    rate_sum += rate;
  }
  a.meta.sink_rate = rate_sum / static_cast<double>(L);

  // ---- section 2: the residual stream at position zero
  a.norm_p0 = FloatArray({uN, uL + 1}, "probe,layer");
  a.norm_rest_median = FloatArray({uN, uL + 1}, "probe,layer");
  a.h_ratio = FloatArray({uL + 1}, "layer");
  a.p0_cosine = FloatArray({uL + 1}, "layer");
  a.massive_p0 = IntArray({uL + 1}, "layer");
  std::vector<double> h_ratio(uL + 1, 0.0);
  for (int64_t l = 0; l <= L; ++l) {
    for (int64_t n = 0; n < N; ++n) {
      const Vec& x = traces[n].x[l];
      const double p0 = norm2(&x[0], D);
      Vec rest;
      for (int64_t i = 1; i < T; ++i) rest.push_back(norm2(&x[i * D], D));
      const double med = median(rest);
      a.norm_p0.at(n, l) = static_cast<float>(p0);
      a.norm_rest_median.at(n, l) = static_cast<float>(med);
      h_ratio[l] += p0 / med / dN;
    }
    a.h_ratio.at(l) = static_cast<float>(h_ratio[l]);
    // Mean over pairs of distinct probes n < m of the cosine of x_l[0].
    double cos_sum = 0;
    int64_t pairs = 0;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t m = n + 1; m < N; ++m) {
        const double* xn = &traces[n].x[l][0];
        const double* xm = &traces[m].x[l][0];
        cos_sum += dot(xn, xm, D) / (norm2(xn, D) * norm2(xm, D));
        ++pairs;
      }
    a.p0_cosine.at(l) =
        pairs > 0 ? static_cast<float>(cos_sum / static_cast<double>(pairs)) : std::nanf("");
    // Sun et al. on probe 0: |x_l[0, c]| > 100 and > 1000 x median over all (i, c') of |x_l[i,
    // c']|.
    const Vec& x0 = traces[0].x[l];
    Vec mags(x0.size());
    for (size_t j = 0; j < x0.size(); ++j) mags[j] = std::fabs(x0[j]);
    const double med = median(mags);
    int32_t count = 0;
    for (int64_t cc = 0; cc < D; ++cc)
      if (std::fabs(x0[cc]) > 100.0 && std::fabs(x0[cc]) > 1000.0 * med) ++count;
    a.massive_p0.at(l) = count;
  }

  // ---- section 3: component writes and routing
  auto p0_and_rest = [&](const Vec& w, double* p0, double* rest) {
    *p0 = norm2(&w[0], D);
    double s = 0;
    for (int64_t i = 1; i < T; ++i) s += norm2(&w[i * D], D);
    *rest = s / static_cast<double>(T - 1);
  };
  a.attn_head_p0 = FloatArray({uL, uH}, "layer,head");
  a.attn_head_rest = FloatArray({uL, uH}, "layer,head");
  a.moe_p0 = FloatArray({uL}, "layer");
  a.moe_rest = FloatArray({uL}, "layer");
  a.expert_p0 = FloatArray({uL, uE}, "layer,expert");
  a.p0_topk_freq = FloatArray({uL, uE}, "layer,expert");
  a.rest_topk_freq = FloatArray({uL, uE}, "layer,expert");
  R.p0_routed_count.assign(uL * uE, 0);
  R.rest_routed_count.assign(uL * uE, 0);
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t h = 0; h < H; ++h) {
      double sp = 0, sr = 0;
      for (int64_t n = 0; n < N; ++n) {
        double p0, rest;
        p0_and_rest(traces[n].head[l][h], &p0, &rest);
        sp += p0;
        sr += rest;
      }
      a.attn_head_p0.at(l, h) = static_cast<float>(sp / dN);
      a.attn_head_rest.at(l, h) = static_cast<float>(sr / dN);
    }
    double sp = 0, sr = 0;
    for (int64_t n = 0; n < N; ++n) {
      double p0, rest;
      p0_and_rest(traces[n].m[l], &p0, &rest);
      sp += p0;
      sr += rest;
    }
    a.moe_p0.at(l) = static_cast<float>(sp / dN);
    a.moe_rest.at(l) = static_cast<float>(sr / dN);
    if (!impl_->layers[l].moe) continue;  // expert datasets stay zero on dense layers
    for (int64_t e = 0; e < E; ++e) {
      double s = 0;
      for (int64_t n = 0; n < N; ++n) s += norm2(&traces[n].ffn[l][e][0], D);
      a.expert_p0.at(l, e) = static_cast<float>(s / dN);
    }
    for (int64_t n = 0; n < N; ++n)
      for (int64_t i = 0; i < T; ++i)
        for (int e : traces[n].topk[l][i])
          ++(i == 0 ? R.p0_routed_count : R.rest_routed_count)[l * E + e];
    for (int64_t e = 0; e < E; ++e) {
      a.p0_topk_freq.at(l, e) =
          static_cast<float>(static_cast<double>(R.p0_routed_count[l * E + e]) / dN);
      a.rest_topk_freq.at(l, e) = static_cast<float>(
          static_cast<double>(R.rest_routed_count[l * E + e]) / (dN * static_cast<double>(T - 1)));
    }
  }

  // ---- section 4: differential key attribution with frozen r_x, r_k
  R.attr_embed.assign(uL * uH, 0.0);
  R.attr_head.assign(uL * uH * uL * uH, 0.0);
  R.attr_expert.assign(uL * uH * uL * uE, 0.0);
  R.attr_mlp.assign(uL * uH * uL, 0.0);
  for (int64_t n = 0; n < N; ++n) {
    const Trace& tr = traces[n];
    for (int64_t t = 0; t < L; ++t) {
      const Layer& W = impl_->layers[t];
      for (int64_t g = 0; g < KV; ++g) {
        // K(v) = gamma_k * (W_K^g (gamma_in * v)) / (r_x r_k)
        auto Kof = [&](const double* v) {
          Vec gv(static_cast<size_t>(D));
          for (int64_t j = 0; j < D; ++j) gv[j] = W.in_norm[j] * v[j];
          Vec k = apply_rows(W.k, g * d, d, gv.data());
          for (int64_t r = 0; r < d; ++r) k[r] = W.k_norm[r] * k[r] / (tr.rx[t] * tr.rk[t][g]);
          return k;
        };
        Vec ksum(static_cast<size_t>(d), 0.0);
        // attr(c -> t,h) for every query head h of KV head g, from c's write [T, D].
        auto attribute = [&](const Vec& w, auto&& store) {
          const Vec k_p0 = Kof(&w[0]);
          const Vec cbar = rest_mean(w, T, D);
          const Vec k_bar = Kof(cbar.data());
          for (int64_t r = 0; r < d; ++r) ksum[r] += k_p0[r];
          for (int64_t h = g * group; h < (g + 1) * group; ++h) {
            double acc = 0;
            for (int64_t r = 0; r < d; ++r) acc += tr.qbar[t][h][r] * (k_p0[r] - k_bar[r]);
            store(h, acc * inv_sqrt_d / dN);
          }
        };
        attribute(tr.embed, [&](int64_t h, double v) { R.attr_embed[t * H + h] += v; });
        for (int64_t l = 0; l < t; ++l) {
          for (int64_t s = 0; s < H; ++s)
            attribute(tr.head[l][s], [&](int64_t h, double v) {
              R.attr_head[((t * H + h) * L + l) * H + s] += v;
            });
          if (impl_->layers[l].moe) {
            for (int64_t e = 0; e < E; ++e)
              attribute(tr.ffn[l][e], [&](int64_t h, double v) {
                R.attr_expert[((t * H + h) * L + l) * E + e] += v;
              });
          } else {
            attribute(tr.ffn[l][0],
                      [&](int64_t h, double v) { R.attr_mlp[(t * H + h) * L + l] += v; });
          }
        }
        // Identity: sum over components of K(c[0]) equals the model's k_0.
        const Vec& k0 = tr.k0[t][g];
        double diff = 0, nrm = 0;
        for (int64_t r = 0; r < d; ++r) {
          diff += (k0[r] - ksum[r]) * (k0[r] - ksum[r]);
          nrm += k0[r] * k0[r];
        }
        R.identity_max_rel_err = std::max(R.identity_max_rel_err, std::sqrt(diff / nrm));
      }
    }
  }
  a.attr_embed = FloatArray({uL, uH}, "target_layer,target_head");
  a.attr_head = FloatArray({uL, uH, uL, uH}, "target_layer,target_head,source_layer,source_head");
  a.attr_expert =
      FloatArray({uL, uH, uL, uE}, "target_layer,target_head,source_layer,source_expert");
  a.attr_mlp = FloatArray({uL, uH, uL}, "target_layer,target_head,source_layer");
  auto to_float = [](const std::vector<double>& src, FloatArray& dst) {
    for (size_t i = 0; i < src.size(); ++i) dst.data[i] = static_cast<float>(src[i]);
  };
  to_float(R.attr_embed, a.attr_embed);
  to_float(R.attr_head, a.attr_head);
  to_float(R.attr_expert, a.attr_expert);
  to_float(R.attr_mlp, a.attr_mlp);

  // ---- section 5: layer-concentration profile (from the double values)
  std::vector<double> share(uL + 1, 0.0);
  for (int64_t t = 0; t < L; ++t)
    for (int64_t h = 0; h < H; ++h) {
      const double alpha = R.sink_score[t * H + h];
      share[0] += alpha * std::max(0.0, R.attr_embed[t * H + h]);
      for (int64_t l = 0; l < t; ++l) {
        double s = 0;
        for (int64_t j = 0; j < H; ++j)
          s += std::max(0.0, R.attr_head[((t * H + h) * L + l) * H + j]);
        for (int64_t e = 0; e < E; ++e)
          s += std::max(0.0, R.attr_expert[((t * H + h) * L + l) * E + e]);
        s += std::max(0.0, R.attr_mlp[(t * H + h) * L + l]);
        share[1 + l] += alpha * s;
      }
    }
  const double total = std::accumulate(share.begin(), share.end(), 0.0);
  a.layer_share = FloatArray({uL + 1}, "layer_index");
  for (size_t i = 0; i <= uL; ++i) {
    share[i] = total > 0 ? share[i] / total : 0.0;
    a.layer_share.at(i) = static_cast<float>(share[i]);
  }
  a.first2_share = static_cast<float>((L >= 1 ? share[1] : 0.0) + (L >= 2 ? share[2] : 0.0));
  a.peak_layer = 0;
  for (int64_t l = 1; l < L; ++l)
    if (share[1 + l] > share[1 + a.peak_layer]) a.peak_layer = static_cast<int32_t>(l);
  double entropy = 0;
  for (double p : share)
    if (p > 0) entropy -= p * std::log(p);
  a.entropy = static_cast<float>(entropy);
  a.norm_gain_share = FloatArray({uL}, "layer");
  std::vector<double> gain(uL);
  double gsum = 0;
  for (int64_t l = 0; l < L; ++l) {
    gain[l] = std::max(0.0, std::log(h_ratio[l + 1]) - std::log(h_ratio[l]));
    gsum += gain[l];
  }
  for (int64_t l = 0; l < L; ++l)
    a.norm_gain_share.at(l) = static_cast<float>(gsum > 0 ? gain[l] / gsum : 0.0);
  return R;
}

}  // namespace sinkscope::reference
