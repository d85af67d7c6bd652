// cuDNN's fused causal attention through the backend (graph) API. The operation graph is the one
// cuDNN's SDPA forward engine recognises:
//
//   S = Q K^T (fp32)  ->  S * scale  ->  causal mask (row >= column keeps S, else -inf)
//     -> m = rowmax(S), E = exp(S - m), l = rowsum(E), lse = m + log(l) (written), P = E / l (bf16)
//     -> O = P V (bf16)
//
// with Q [B, Hq, T, dqk], K^T [B, Hk, dqk, T], V [B, Hk, T, dv] and O [B, Hq, T, dv] described by
// strides over sinkscope's row layouts, so nothing is copied or transposed. A plan is built once
// per shape (engine heuristics, first configuration that finalises) and kept with its workspace.
#include "cuda/cudnn_attention.hpp"

#include "cuda/check.hpp"

#if defined(SINKSCOPE_HAVE_CUDNN)

#include <cudnn.h>

#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

namespace sinkscope::cuda::k {
namespace {

// A cuDNN status that is not success, as the exception of the cuDNN path.
struct CudnnError {
  cudnnStatus_t status;
  const char* call;
};

std::string describe(cudnnStatus_t status) {
  std::string s = cudnnGetErrorString(status);
  char msg[512] = {0};
  cudnnGetLastErrorString(msg, sizeof msg);
  if (msg[0]) s += std::string(": ") + msg;
  return s;
}

void ok(cudnnStatus_t status, const char* call) {
  if (status != CUDNN_STATUS_SUCCESS) throw CudnnError{status, call};
}
#define SINKSCOPE_CUDNN(call) ok((call), #call)

// An owned backend descriptor.
class Desc {
 public:
  explicit Desc(cudnnBackendDescriptorType_t type) {
    SINKSCOPE_CUDNN(cudnnBackendCreateDescriptor(type, &d_));
  }
  Desc(const Desc&) = delete;
  Desc& operator=(const Desc&) = delete;
  Desc(Desc&& o) noexcept : d_(std::exchange(o.d_, nullptr)) {}
  ~Desc() {
    if (d_) cudnnBackendDestroyDescriptor(d_);
  }
  cudnnBackendDescriptor_t get() const { return d_; }

  template <typename T>
  Desc& set(cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type, const T* values,
            int64_t n = 1) {
    SINKSCOPE_CUDNN(cudnnBackendSetAttribute(d_, name, type, n, values));
    return *this;
  }
  Desc& set_desc(cudnnBackendAttributeName_t name, const Desc& other) {
    cudnnBackendDescriptor_t o = other.get();
    return set(name, CUDNN_TYPE_BACKEND_DESCRIPTOR, &o);
  }
  Desc& finalize() {
    SINKSCOPE_CUDNN(cudnnBackendFinalize(d_));
    return *this;
  }

 private:
  cudnnBackendDescriptor_t d_ = nullptr;
};

enum Uid : int64_t { kQ = 1, kK, kV, kO, kLse, kScale, kNegInf, kVirtual = 100 };

// The graph's tensors and operations, owned while the plan is built.
class GraphBuilder {
 public:
  // A tensor of 4 dims; virtual ones get fresh ids.
  const Desc& tensor(int64_t uid, cudnnDataType_t type, std::vector<int64_t> dims,
                     std::vector<int64_t> strides, bool is_virtual, bool by_value = false) {
    Desc t(CUDNN_BACKEND_TENSOR_DESCRIPTOR);
    const int64_t alignment = 16;
    t.set(CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, &type)
        .set(CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, dims.data(),
             static_cast<int64_t>(dims.size()))
        .set(CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, strides.data(),
             static_cast<int64_t>(strides.size()))
        .set(CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, &uid)
        .set(CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, &alignment);
    if (is_virtual) {
      const bool v = true;
      t.set(CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, &v);
    }
    if (by_value) {
      const bool v = true;
      t.set(CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, &v);
    }
    t.finalize();
    tensors_.push_back(std::make_unique<Desc>(std::move(t)));
    return *tensors_.back();
  }
  const Desc& virtual_like(cudnnDataType_t type, std::vector<int64_t> dims,
                           std::vector<int64_t> strides) {
    return tensor(next_virtual_++, type, std::move(dims), std::move(strides), true);
  }
  const Desc& scalar(int64_t uid) {
    return tensor(uid, CUDNN_DATA_FLOAT, {1, 1, 1, 1}, {1, 1, 1, 1}, false, true);
  }

  // y = op(x [, b [, t]]) with math in `math` (gen_index takes an axis).
  void pointwise(cudnnPointwiseMode_t mode, const Desc& x, const Desc* b, const Desc* t,
                 const Desc& y, cudnnDataType_t math = CUDNN_DATA_FLOAT, int64_t axis = -1) {
    Desc pw(CUDNN_BACKEND_POINTWISE_DESCRIPTOR);
    pw.set(CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, &mode)
        .set(CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, &math);
    if (axis >= 0) pw.set(CUDNN_ATTR_POINTWISE_AXIS, CUDNN_TYPE_INT64, &axis);
    pw.finalize();
    Desc op(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR);
    op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pw)
        .set_desc(CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x);
    if (b) op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_BDESC, *b);
    if (t) op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_TDESC, *t);
    op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y).finalize();
    keep(std::move(pw));
    ops_.push_back(std::make_unique<Desc>(std::move(op)));
  }
  void matmul(const Desc& a, const Desc& b, const Desc& c) {
    Desc mm(CUDNN_BACKEND_MATMUL_DESCRIPTOR);
    const cudnnDataType_t comp = CUDNN_DATA_FLOAT;
    mm.set(CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, &comp).finalize();
    Desc op(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR);
    op.set_desc(CUDNN_ATTR_OPERATION_MATMUL_ADESC, a)
        .set_desc(CUDNN_ATTR_OPERATION_MATMUL_BDESC, b)
        .set_desc(CUDNN_ATTR_OPERATION_MATMUL_CDESC, c)
        .set_desc(CUDNN_ATTR_OPERATION_MATMUL_DESC, mm)
        .finalize();
    keep(std::move(mm));
    ops_.push_back(std::make_unique<Desc>(std::move(op)));
  }
  void reduce(cudnnReduceTensorOp_t mode, const Desc& x, const Desc& y) {
    Desc red(CUDNN_BACKEND_REDUCTION_DESCRIPTOR);
    const cudnnDataType_t comp = CUDNN_DATA_FLOAT;
    red.set(CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, &mode)
        .set(CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, &comp)
        .finalize();
    Desc op(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR);
    op.set_desc(CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x)
        .set_desc(CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y)
        .set_desc(CUDNN_ATTR_OPERATION_REDUCTION_DESC, red)
        .finalize();
    keep(std::move(red));
    ops_.push_back(std::make_unique<Desc>(std::move(op)));
  }

  Desc operation_graph(cudnnHandle_t handle) {
    std::vector<cudnnBackendDescriptor_t> ops;
    for (const auto& o : ops_) ops.push_back(o->get());
    Desc g(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR);
    g.set(CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, &handle)
        .set(CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, ops.data(),
             static_cast<int64_t>(ops.size()))
        .finalize();
    return g;
  }

 private:
  void keep(Desc d) { others_.push_back(std::make_unique<Desc>(std::move(d))); }
  std::vector<std::unique_ptr<Desc>> tensors_, ops_, others_;
  int64_t next_virtual_ = kVirtual;
};

// The SDPA forward graph of `sh` (see the file comment).
Desc build_graph(GraphBuilder& g, const CudnnAttnShape& sh, cudnnHandle_t handle) {
  const int64_t B = sh.B, T = sh.T, Hq = sh.Hq, Hk = sh.Hk, dqk = sh.dqk, dv = sh.dv;
  const Desc& q =
      g.tensor(kQ, CUDNN_DATA_BFLOAT16, {B, Hq, T, dqk}, {T * sh.q_ld, dqk, sh.q_ld, 1}, false);
  // Q's heads are dqk apart in a row: sinkscope packs heads at the padded width, which is dqk.
  const Desc& kt =
      g.tensor(kK, CUDNN_DATA_BFLOAT16, {B, Hk, dqk, T}, {T * sh.kv_ld, dqk, 1, sh.kv_ld}, false);
  const Desc& v =
      g.tensor(kV, CUDNN_DATA_BFLOAT16, {B, Hk, T, dv}, {T * sh.kv_ld, dqk, sh.kv_ld, 1}, false);
  const Desc& o =
      g.tensor(kO, CUDNN_DATA_BFLOAT16, {B, Hq, T, dv}, {T * sh.z_ld, dv, sh.z_ld, 1}, false);
  const Desc& lse = g.tensor(kLse, CUDNN_DATA_FLOAT, {B, Hq, T, 1}, {Hq * T, T, 1, 1}, false);
  const Desc& scale = g.scalar(kScale);
  const Desc& neg_inf = g.scalar(kNegInf);

  const std::vector<int64_t> sd = {B, Hq, T, T}, ss = {Hq * T * T, T * T, T, 1};
  const std::vector<int64_t> rd = {B, Hq, T, 1}, rs = {Hq * T, T, 1, 1};
  const Desc& s = g.virtual_like(CUDNN_DATA_FLOAT, sd, ss);
  g.matmul(q, kt, s);
  const Desc& scaled = g.virtual_like(CUDNN_DATA_FLOAT, sd, ss);
  g.pointwise(CUDNN_POINTWISE_MUL, s, &scale, nullptr, scaled);
  const Desc& row = g.virtual_like(CUDNN_DATA_INT32, sd, ss);
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, scaled, nullptr, nullptr, row, CUDNN_DATA_FLOAT, 2);
  const Desc& col = g.virtual_like(CUDNN_DATA_INT32, sd, ss);
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, scaled, nullptr, nullptr, col, CUDNN_DATA_FLOAT, 3);
  const Desc& keep = g.virtual_like(CUDNN_DATA_BOOLEAN, sd, ss);
  g.pointwise(CUDNN_POINTWISE_CMP_GE, row, &col, nullptr, keep, CUDNN_DATA_BOOLEAN);
  const Desc& masked = g.virtual_like(CUDNN_DATA_FLOAT, sd, ss);
  g.pointwise(CUDNN_POINTWISE_BINARY_SELECT, scaled, &neg_inf, &keep, masked);
  const Desc& mx = g.virtual_like(CUDNN_DATA_FLOAT, rd, rs);
  g.reduce(CUDNN_REDUCE_TENSOR_MAX, masked, mx);
  const Desc& shifted = g.virtual_like(CUDNN_DATA_FLOAT, sd, ss);
  g.pointwise(CUDNN_POINTWISE_SUB, masked, &mx, nullptr, shifted);
  const Desc& e = g.virtual_like(CUDNN_DATA_FLOAT, sd, ss);
  g.pointwise(CUDNN_POINTWISE_EXP, shifted, nullptr, nullptr, e);
  const Desc& sum = g.virtual_like(CUDNN_DATA_FLOAT, rd, rs);
  g.reduce(CUDNN_REDUCE_TENSOR_ADD, e, sum);
  const Desc& log_sum = g.virtual_like(CUDNN_DATA_FLOAT, rd, rs);
  g.pointwise(CUDNN_POINTWISE_LOG, sum, nullptr, nullptr, log_sum);
  g.pointwise(CUDNN_POINTWISE_ADD, mx, &log_sum, nullptr, lse);
  // P is bf16, V's type: the engine takes both products' operands in one type.
  const Desc& p = g.virtual_like(CUDNN_DATA_BFLOAT16, sd, ss);
  g.pointwise(CUDNN_POINTWISE_DIV, e, &sum, nullptr, p);
  g.matmul(p, v, o);
  return g.operation_graph(handle);
}

struct Plan {
  std::unique_ptr<Desc> plan;  // null: no engine for this shape
  DeviceBuffer<unsigned char> workspace;
  int64_t workspace_bytes = 0;
};

// The first engine configuration of the heuristics' list (mode A, then the fallback list) that
// finalises into an execution plan.
std::unique_ptr<Desc> make_plan(const Desc& graph, cudnnHandle_t handle, std::string& why) {
  for (cudnnBackendHeurMode_t mode : {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_FALLBACK}) {
    Desc heur(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
    cudnnBackendDescriptor_t gd = graph.get();
    heur.set(CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, CUDNN_TYPE_BACKEND_DESCRIPTOR, &gd)
        .set(CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, &mode);
    try {
      heur.finalize();
    } catch (const CudnnError& e) {
      why = std::string(e.call) + ": " + describe(e.status);
      continue;
    }
    int64_t count = 0;
    SINKSCOPE_CUDNN(cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                             CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count, nullptr));
    std::vector<Desc> cfgs;
    std::vector<cudnnBackendDescriptor_t> raw;
    for (int64_t i = 0; i < count; ++i) {
      cfgs.emplace_back(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR);
      raw.push_back(cfgs.back().get());
    }
    int64_t got = 0;
    if (count > 0)
      SINKSCOPE_CUDNN(cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                               CUDNN_TYPE_BACKEND_DESCRIPTOR, count, &got,
                                               raw.data()));
    if (got == 0) why = "the engine heuristics offered no configuration";
    for (int64_t i = 0; i < got; ++i) {
      auto plan = std::make_unique<Desc>(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
      try {
        cudnnBackendDescriptor_t cfg = raw[static_cast<size_t>(i)];
        plan->set(CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, &handle)
            .set(CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, CUDNN_TYPE_BACKEND_DESCRIPTOR, &cfg)
            .finalize();
        return plan;
      } catch (const CudnnError& e) {
        why = std::string(e.call) + ": " + describe(e.status);
      }
    }
  }
  return nullptr;
}

using Shape = std::tuple<int, int, int, int, int, int, int64_t, int64_t, int64_t>;

// One stream's cuDNN state: its own handle and the plans (with their workspaces) of the shapes it
// has run. Every backend (rank) has its own stream, so ranks sharing a device in one process never
// share a workspace or a handle's internal scratch between concurrent streams.
struct StreamContext {
  cudnnHandle_t handle = nullptr;
  std::map<Shape, Plan> plans;
};

// Per process: the stream contexts under one lock (a plan is built once per stream and shape; a
// call after that sets the handle's stream and executes).
struct State {
  std::mutex mu;
  std::map<std::pair<int, cudaStream_t>, StreamContext> contexts;
  std::string last_refusal;

  StreamContext& context(int device, cudaStream_t s) {
    StreamContext& c = contexts[{device, s}];
    if (!c.handle) {
      SINKSCOPE_CUDNN(cudnnCreate(&c.handle));
      SINKSCOPE_CUDNN(cudnnSetStream(c.handle, s));
    }
    return c;
  }
  Plan& plan(StreamContext& c, const CudnnAttnShape& sh) {
    const Shape key{sh.B, sh.T, sh.Hq, sh.Hk, sh.dqk, sh.dv, sh.q_ld, sh.kv_ld, sh.z_ld};
    auto it = c.plans.find(key);
    if (it != c.plans.end()) return it->second;
    Plan p;
    std::string why;
    try {
      GraphBuilder g;
      const Desc graph = build_graph(g, sh, c.handle);
      p.plan = make_plan(graph, c.handle, why);
      if (p.plan) {
        SINKSCOPE_CUDNN(cudnnBackendGetAttribute(p.plan->get(),
                                                 CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
                                                 CUDNN_TYPE_INT64, 1, nullptr, &p.workspace_bytes));
        if (p.workspace_bytes > 0) p.workspace.reserve(static_cast<size_t>(p.workspace_bytes));
      }
    } catch (const CudnnError& e) {
      p.plan.reset();
      why = std::string(e.call) + ": " + describe(e.status);
    }
    if (!p.plan) last_refusal = why.empty() ? "no engine" : why;
    return c.plans.emplace(key, std::move(p)).first->second;
  }
};

State& state() {
  static State* s = new State;  // never destroyed: handles may outlive static destruction order
  return *s;
}

int current_device() {
  int dev = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  return dev;
}

}  // namespace

bool cudnn_attention_built() { return true; }

int cudnn_version() { return static_cast<int>(cudnnGetVersion()); }

bool cudnn_attention_supported(const CudnnAttnShape& sh, cudaStream_t s) {
  if (sh.B <= 0 || sh.T <= 0 || sh.Hq <= 0 || sh.Hk <= 0 || sh.Hq % sh.Hk != 0) return false;
  if (sh.dqk % 8 != 0 || sh.dv % 8 != 0 || sh.dqk > 256 || sh.dv > 256) return false;
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  try {
    return st.plan(st.context(current_device(), s), sh).plan != nullptr;
  } catch (const CudnnError& e) {  // no handle: cuDNN cannot run here at all
    st.last_refusal = std::string(e.call) + ": " + describe(e.status);
    return false;
  }
}

void cudnn_attention(const CudnnAttnShape& sh, const bf16_bits* Q, const bf16_bits* K,
                     const bf16_bits* V, bf16_bits* z, float* lse, float scale, cudaStream_t s) {
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  float neg_inf = -std::numeric_limits<float>::infinity();
  if (cudnnGetVersion() < 91000) neg_inf = std::numeric_limits<float>::lowest();
  int64_t uids[] = {kQ, kK, kV, kO, kLse, kScale, kNegInf};
  void* ptrs[] = {const_cast<bf16_bits*>(Q),
                  const_cast<bf16_bits*>(K),
                  const_cast<bf16_bits*>(V),
                  z,
                  lse,
                  &scale,
                  &neg_inf};
  try {
    StreamContext& c = st.context(current_device(), s);
    Plan& p = st.plan(c, sh);
    if (!p.plan)
      throw_api_failure("cuDNN", "no engine for this attention shape: " + st.last_refusal,
                        "cudnn_attention", __FILE__, __LINE__);
    SINKSCOPE_CUDNN(cudnnSetStream(c.handle, s));  // a stream made later at a freed one's address
    Desc pack(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR);
    void* ws = p.workspace_bytes > 0 ? p.workspace.get() : nullptr;
    pack.set(CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, uids, 7)
        .set(CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, ptrs, 7)
        .set(CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, &ws)
        .finalize();
    SINKSCOPE_CUDNN(cudnnBackendExecute(c.handle, p.plan->get(), pack.get()));
  } catch (const CudnnError& e) {
    throw_api_failure("cuDNN", describe(e.status), e.call, __FILE__, __LINE__);
  }
}

std::string cudnn_attention_last_refusal() {
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  return st.last_refusal;
}

}  // namespace sinkscope::cuda::k

#else  // without cuDNN in the build: the hand-written kernels run

namespace sinkscope::cuda::k {

bool cudnn_attention_built() { return false; }
int cudnn_version() { return 0; }
bool cudnn_attention_supported(const CudnnAttnShape&, cudaStream_t) { return false; }
void cudnn_attention(const CudnnAttnShape&, const bf16_bits*, const bf16_bits*, const bf16_bits*,
                     bf16_bits*, float*, float, cudaStream_t) {
  throw_api_failure("cuDNN", "this build has no cuDNN (configure with SINKSCOPE_CUDNN)",
                    "cudnn_attention", __FILE__, __LINE__);
}
std::string cudnn_attention_last_refusal() { return "this build has no cuDNN"; }

}  // namespace sinkscope::cuda::k

#endif
