// `sinkscope plan --calibrate --device cuda`: the CUDA coefficients of the planner's cost model
// measured on this rank's GPU (docs/planner.md "Calibration"): the bf16 GEMM rate of the backend's
// products (cuBLAS) at a large and a small row count, the fused attention's causal rate, the
// checkpoint load rate through the backend's own loader (a small model written by `synth` into the
// scratch folder, warm in the page cache), recording's share and the elementwise cost of a forward
// (two Qwen3-30B-A3B layers made on the device, run with and without recording), and the device
// memory the context and libraries take.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <vector>

#include "cuda/backend.hpp"
#include "cuda/check.hpp"
#include "cuda/device_buffer.hpp"
#include "cuda/gemm.hpp"
#include "cuda/kernels.cuh"
#include "plan/scratch_model.hpp"
#include "sinkscope/checkpoint.hpp"
#include "sinkscope/comm.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/hooks.hpp"
#include "sinkscope/plan.hpp"
#include "sinkscope/probes.hpp"
#include "sinkscope/shard_plan.hpp"

namespace sinkscope {
namespace {

using Clock = std::chrono::steady_clock;

// Device milliseconds of `f` on `s`: the best of `reps` after one warm-up.
template <class F>
double best_ms(cudaStream_t s, int reps, F&& f) {
  cudaEvent_t a, b;
  CUDA_CHECK(cudaEventCreate(&a));
  CUDA_CHECK(cudaEventCreate(&b));
  f();
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    CUDA_CHECK(cudaEventRecord(a, s));
    f();
    CUDA_CHECK(cudaEventRecord(b, s));
    CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    best = std::min(best, static_cast<double>(ms));
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return best;
}

// GFLOP/s of C[M, N] (fp32) = A[M, K] B[N, K]^T in bf16, as the backend's projections run.
double gemm_gflops(cuda::Blas& blas, cudaStream_t s, int64_t M, int64_t N, int64_t K) {
  cuda::DeviceBuffer<cuda::bf16_bits> A(static_cast<size_t>(M * K)), B(static_cast<size_t>(N * K));
  cuda::DeviceBuffer<float> C(static_cast<size_t>(M * N));
  cuda::k::fill_random_bf16(A.get(), M, K, 0, 0, K, 1, 1, 1.f, s);
  cuda::k::fill_random_bf16(B.get(), N, K, 0, 0, K, 1, 2, 1.f, s);
  const double ms = best_ms(s, 5, [&] {
    blas.nt(M, N, K, {A.get(), cuda::Dt::kBF16, K}, {B.get(), cuda::Dt::kBF16, K},
            {C.get(), cuda::Dt::kF32, N});
  });
  return 2.0 * static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K) /
         (ms * 1e-3) / 1e9;
}

// GFLOP/s of the fused causal attention (A[i, 0] included) at Qwen3-30B-A3B's head shape.
double attention_gflops(cudaStream_t s) {
  const int B = 2, T = 4096, H = 32, KV = 4, d = 128;
  const int64_t rows = static_cast<int64_t>(B) * T;
  cuda::DeviceBuffer<cuda::bf16_bits> Q(static_cast<size_t>(rows * H * d)),
      K(static_cast<size_t>(rows * KV * d)), V(static_cast<size_t>(rows * KV * d)),
      z(static_cast<size_t>(rows * H * d));
  cuda::DeviceBuffer<float> a0(static_cast<size_t>(B) * H * T);
  const int64_t vt = cuda::k::flash_attention_scratch(B, T, KV, d);
  cuda::DeviceBuffer<cuda::bf16_bits> Vt(static_cast<size_t>(std::max<int64_t>(vt, 1)));
  cuda::k::fill_random_bf16(Q.get(), rows * H, d, 0, 0, d, 2, 1, 1.f, s);
  cuda::k::fill_random_bf16(K.get(), rows * KV, d, 0, 0, d, 2, 2, 1.f, s);
  cuda::k::fill_random_bf16(V.get(), rows * KV, d, 0, 0, d, 2, 3, 1.f, s);
  const double ms = best_ms(s, 5, [&] {
    cuda::k::flash_attention(Q.get(), K.get(), V.get(), z.get(), a0.get(), B, T, H, KV, d, d, 0,
                             H / KV, 0, 1.f / std::sqrt(static_cast<float>(d)),
                             vt > 0 ? Vt.get() : nullptr, s);
  });
  const double flops = static_cast<double>(B) * 4.0 * H * d * static_cast<double>(T) *
                       (static_cast<double>(T) + 1) / 2;
  return flops / (ms * 1e-3) / 1e9;
}

struct Discard final : ForwardObserver {};

}  // namespace

PlanCoefficients calibrate_cuda(const std::string& scratch_dir, const Comm& world) {
  if (cuda::visible_device_count() == 0)
    throw InputError("plan --calibrate --device cuda: no CUDA device is visible on " + host_name());
  PlanCoefficients k = default_coefficients("cuda");
  CUDA_CHECK(cudaSetDevice(world.rank() % cuda::visible_device_count()));
  cudaStream_t s = nullptr;
  CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  struct StreamGuard {
    cudaStream_t s;
    ~StreamGuard() { cudaStreamDestroy(s); }
  } guard{s};
  {
    cuda::Blas blas(s);
    size_t free_b = 0, total_b = 0;
    CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    k.base_mib = static_cast<double>(total_b - free_b) / (1024.0 * 1024.0);
    // Projections of an 8 x 4096 micro-batch; the small product gives the half-rate row count of
    // rate(M) = r M / (M + h).
    k.gemm_gflops = gemm_gflops(blas, s, 32768, 4096, 2048);
    const double small = gemm_gflops(blas, s, 128, 4096, 2048);
    k.gemm_half_m = small < k.gemm_gflops ? 128.0 * (k.gemm_gflops / small - 1.0) : 0.0;
    k.attention_gflops = attention_gflops(s);
  }

  // A small MoE model written by synth (about 0.5 GB of bf16), loaded through the backend's own
  // path twice: the second load is the warm, page-cache rate.
  const ScratchModel model(scratch_dir, moe_config_json({4096, 1024, 4, 16, 4, 64, 32, 4, 512}), 7);
  const Checkpoint& ck = model.checkpoint();
  const ForwardComms comms = model.comms();
  const ShardPlan plan = ShardPlan::make(1, 0, 1, 1, ck.config(), 1);
  std::unique_ptr<Backend> be;
  double load_s = 0;
  for (int rep = 0; rep < 2; ++rep) {
    be.reset();
    const auto t = Clock::now();
    be = make_cuda_backend(ck, plan, comms, ForwardOptions{});
    load_s = std::chrono::duration<double>(Clock::now() - t).count();
  }
  k.load_gbps = static_cast<double>(be->weight_bytes_loaded()) / load_s / 1e9;
  be.reset();
  // The forward of two Qwen3-30B-A3B layers with weights made on the device (8 x 2048 tokens),
  // with and without recording: recording's share, and what the work between the products costs
  // beyond the GEMM and attention rates above (the elementwise coefficient).
  const ModelConfig shape = parse_model_config_text(
      moe_config_json({151936, 2048, 2, 32, 4, 128, 128, 8, 768}), "the calibration shape");
  const int64_t N = 8, T = 2048;
  be = make_cuda_backend_synthetic(shape, ShardPlan::make(1, 0, 1, 1, shape, 1), comms,
                                   ForwardOptions{}, 11);
  const IntArray tokens =
      make_probes("random:" + std::to_string(N) + ":" + std::to_string(T) + ":1", shape.vocab_size);
  Discard none;
  auto timed = [&](bool record) {
    cuda::set_recording(*be, record);
    be->run(tokens, 0, none);  // warm-up
    double best = 1e30;
    for (int i = 0; i < 3; ++i) {
      const auto t = Clock::now();
      be->run(tokens, 0, none);
      best = std::min(best, std::chrono::duration<double>(Clock::now() - t).count());
    }
    return best;
  };
  const double plain = timed(false), record = timed(true);
  k.record_fraction = std::max(0.0, record / plain - 1.0);
  k.elementwise_ns = elementwise_ns_from(shape, "cuda", N, T, plain, k);
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  k.source = "calibrated on " + host_name() + " (" + prop.name + ")";
  return k;
}

}  // namespace sinkscope
