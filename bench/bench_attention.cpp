// bench_attention: the CUDA backend's causal attention kernels alone (each also returning A[i, 0]),
// timed with CUDA events on random bf16 inputs in sinkscope's layouts, at the shapes given:
//   mma.sync   the portable flash kernel
//   wgmma      the Hopper warpgroup kernel (sm_90a builds on compute capability 9.0)
//   cudnn      cuDNN's fused attention + the A[i, 0] pass (builds that found cuDNN)
//   cudnn O    cuDNN's attention without the A[i, 0] pass (what A[i, 0] costs on that route)
// TFLOP/s counts the causal products only (2 B H (d + dv) T (T + 1) / 2). The last column is the
// largest difference of A[i, 0] from the mma.sync kernel's, a guard that every route computes the
// same thing. bench/bench_attention.sh prints PyTorch's sdpa backends beside it.
//
//   bench_attention --shapes 8x4096,1x32768 --heads 32 --kv-heads 4 --head-dim 128 --iters 5
#include <cuda_runtime_api.h>

#include <CLI/CLI.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "cuda/attention.cuh"
#include "cuda/cudnn_attention.hpp"
#include "cuda/device_buffer.hpp"
#include "cuda/util_kernels.cuh"

namespace {

using namespace sinkscope;
using cuda::k::AttnKernel;

struct Shape {
  int B = 0, T = 0;
};

std::vector<Shape> parse_shapes(const std::string& text) {
  std::vector<Shape> out;
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t comma = std::min(text.find(',', pos), text.size());
    const std::string item = text.substr(pos, comma - pos);
    const size_t x = item.find('x');
    if (x == std::string::npos) throw CLI::ValidationError("--shapes", "want BxT, got " + item);
    out.push_back({std::stoi(item.substr(0, x)), std::stoi(item.substr(x + 1))});
    pos = comma + 1;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Times the CUDA backend's causal attention kernels (docs/benchmarks.md)"};
  std::string shapes_text = "8x4096,1x32768";
  int H = 32, KV = 4, d = 128, iters = 5;
  app.add_option("--shapes", shapes_text, "comma-separated probes x positions, e.g. 8x4096");
  app.add_option("--heads", H, "query heads")->check(CLI::PositiveNumber);
  app.add_option("--kv-heads", KV, "key/value heads")->check(CLI::PositiveNumber);
  app.add_option("--head-dim", d, "query/key head dim (a multiple of 16, at most 128, or 192)")
      ->check(CLI::PositiveNumber);
  int dv = 0;
  app.add_option("--value-dim", dv,
                 "value head dim (default: the head dim; DeepSeek-V3: 128 of 192)");
  app.add_option("--iters", iters, "timed runs per kernel (the median is printed)")
      ->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);
  if (dv <= 0) dv = d;
  if (dv > d || dv % 8 != 0) {
    std::fprintf(stderr,
                 "bench_attention: --value-dim must be a multiple of 8 and at most --head-dim\n");
    return 1;
  }
  if (H % KV != 0) {
    std::fprintf(stderr, "bench_attention: --heads must be a multiple of --kv-heads\n");
    return 1;
  }
  std::vector<Shape> shapes;
  try {
    shapes = parse_shapes(shapes_text);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_attention: --shapes: %s\n", e.what());
    return 1;
  }

  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  std::printf(
      "device: %s; cuDNN %s; heads %d, kv heads %d, head dim %d (values %d); median of %d\n\n",
      prop.name,
      cuda::k::cudnn_attention_built() ? std::to_string(cuda::k::cudnn_version()).c_str()
                                       : "not in this build",
      H, KV, d, dv, iters);
  std::printf("| shape | kernel | ms | TFLOP/s | max abs diff of A[i,0] from mma.sync |\n");
  std::printf("|---|---|---|---|---|\n");
  cudaStream_t s = nullptr;
  cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  for (const Shape& sh : shapes) {
    const int64_t rows = static_cast<int64_t>(sh.B) * sh.T;
    cuda::DeviceBuffer<cuda::bf16_bits> Q(static_cast<size_t>(rows * H * d)),
        K(static_cast<size_t>(rows * KV * d)), V(static_cast<size_t>(rows * KV * d)),
        z(static_cast<size_t>(rows * H * dv));
    const size_t na0 = static_cast<size_t>(sh.B) * H * sh.T;
    cuda::DeviceBuffer<float> a0(na0);
    const int64_t vt = cuda::k::flash_attention_scratch(sh.B, sh.T, KV, d);
    cuda::DeviceBuffer<cuda::bf16_bits> Vt(static_cast<size_t>(std::max<int64_t>(vt, 1)));
    cuda::k::fill_random_bf16(Q.get(), rows * H, d, 0, 0, d, 2, 1, 1.f, s);
    cuda::k::fill_random_bf16(K.get(), rows * KV, d, 0, 0, d, 2, 2, 1.f, s);
    cuda::k::fill_random_bf16(V.get(), rows * KV, d, 0, 0, d, 2, 3, 1.f, s);
    const double flops = static_cast<double>(sh.B) * 2.0 * H * (d + dv) *
                         static_cast<double>(sh.T) * (static_cast<double>(sh.T) + 1) / 2;
    std::vector<float> ref(na0), got(na0);

    struct Route {
      const char* name;
      AttnKernel kernel;
      bool available;
      bool lse_only = false;  // cuDNN's call alone: z and the log-sum-exp, no A[i, 0] pass
    };
    cuda::k::CudnnAttnShape cs;
    cs.B = sh.B;
    cs.T = sh.T;
    cs.Hq = H;
    cs.Hk = KV;
    cs.dqk = d;
    cs.dv = dv;
    cs.q_ld = static_cast<int64_t>(H) * d;
    cs.kv_ld = static_cast<int64_t>(KV) * d;
    cs.z_ld = static_cast<int64_t>(H) * dv;
    const bool cudnn_ok =
        cuda::k::cudnn_attention_built() && cuda::k::cudnn_attention_supported(cs, s);
    const Route routes[] = {
        {"mma.sync", AttnKernel::kMmaSync, true},
        {"wgmma", AttnKernel::kWgmma, cuda::k::flash_attention_wgmma_available(d)},
        {"cudnn", AttnKernel::kCudnn, cudnn_ok},
        {"cudnn O", AttnKernel::kCudnn, cudnn_ok, true}};
    const std::string label = std::to_string(sh.B) + " x " + std::to_string(sh.T);
    for (const Route& r : routes) {
      if (!r.available) {
        std::printf("| %s | %s | | | not available%s%s |\n", label.c_str(), r.name,
                    r.kernel == AttnKernel::kCudnn && cuda::k::cudnn_attention_built() ? ": " : "",
                    r.kernel == AttnKernel::kCudnn && cuda::k::cudnn_attention_built()
                        ? cuda::k::cudnn_attention_last_refusal().c_str()
                        : "");
        continue;
      }
      auto run = [&] {
        if (r.lse_only)
          return cuda::k::cudnn_attention(cs, Q.get(), K.get(), V.get(), z.get(), a0.get(), scale,
                                          s);
        cuda::k::flash_attention(Q.get(), K.get(), V.get(), z.get(), a0.get(), sh.B, sh.T, H, KV,
                                 dv, d, 0, H / KV, 0, scale, vt > 0 ? Vt.get() : nullptr, s,
                                 r.kernel);
      };
      run();  // warm-up (and the cuDNN plan)
      cudaStreamSynchronize(s);
      std::vector<float> ms;
      cudaEvent_t e0, e1;
      cudaEventCreate(&e0);
      cudaEventCreate(&e1);
      for (int i = 0; i < iters; ++i) {
        cudaEventRecord(e0, s);
        run();
        cudaEventRecord(e1, s);
        cudaEventSynchronize(e1);
        float t = 0;
        cudaEventElapsedTime(&t, e0, e1);
        ms.push_back(t);
      }
      cudaEventDestroy(e0);
      cudaEventDestroy(e1);
      std::sort(ms.begin(), ms.end());
      const double med = ms[ms.size() / 2];
      cudaMemcpy(r.kernel == AttnKernel::kMmaSync ? ref.data() : got.data(), a0.get(), na0 * 4,
                 cudaMemcpyDeviceToHost);
      double diff = 0;
      if (r.lse_only) {
        std::printf("| %s | %s | %.3f | %.1f | (z and log-sum-exp only) |\n", label.c_str(), r.name,
                    med, flops / (med * 1e-3) / 1e12);
        continue;
      }
      if (r.kernel != AttnKernel::kMmaSync)
        for (size_t i = 0; i < na0; ++i)
          diff = std::max(diff, static_cast<double>(std::abs(got[i] - ref[i])));
      std::printf("| %s | %s | %.3f | %.1f | %.2e |\n", label.c_str(), r.name, med,
                  flops / (med * 1e-3) / 1e12, diff);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) {
      std::fprintf(stderr, "bench_attention: CUDA error: %s\n", cudaGetErrorString(err));
      return 1;
    }
  }
  cudaStreamDestroy(s);
  return 0;
}
