// The expert products on Hopper (wgmma, sm_90a): one launch covers every expert of a layer.
//
// A block computes one 128 x 256 tile of one group's C = A W^T: two warpgroups of 64 rows, each a
// m64n256k16 warpgroup product per 16 of K, with A and W tiles of 64 K-columns streaming through
// four shared-memory stages (cp.async, 128-byte swizzle; tile k + 2 is copied while the product of
// tile k runs and tile k - 1's may still be in flight). The tile list is built on the host, which
// knows every group's rows (the routing counts come to the host anyway): for each group, its
// column tiles, and inside each its row tiles next to each other, so blocks that share a weight
// tile run together and read it once from memory.
//
// Two things the cuBLAS route does in separate passes happen here in the product itself: A's rows
// may be gathered by index (a_rows[p] / a_div, the routed pairs' tokens), so the gathered copy of
// the inputs is never written; and the gate|up product may finish with SwiGLU: its 256 weight rows
// are 128 gate rows and the 128 matching up rows, so each thread holds gate and up of the same
// columns and writes silu(gate) * up in bf16 (from the fp32 accumulators, no bf16 round trip).
#include <vector>

#include "cuda/attention.cuh"  // sm90a_kernels_available
#include "cuda/device_common.cuh"
#include "cuda/grouped_gemm.cuh"
#include "cuda/wgmma.cuh"

namespace sinkscope::cuda::k {
namespace {

constexpr int kBM = 128, kBN = 256, kBK = 64, kStages = 4, kThreads = 256;
constexpr int kAStage = kBM * kBK * 2, kBStage = kBN * kBK * 2;
constexpr int kSmem = 1024 + kStages * (kAStage + kBStage);

// groups[g] = {row offset of the group in the packed A / C rows, rows, weight index, 0};
// tiles[t] = {group, first row, first column, 0} (columns of C; of act for SwiGLU).
template <bool kSwiGLU>
__global__ void __launch_bounds__(kThreads, 1)
    grouped_gemm_kernel(const bf16_bits* __restrict__ A, const int32_t* __restrict__ a_rows,
                        int a_div, const bf16_bits* __restrict__ W, bf16_bits* __restrict__ C,
                        int K, int N, int w_rows, const int4* __restrict__ groups,
                        const int4* __restrict__ tiles) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace sm90;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t base = (raw + 1023u) & ~1023u;
  const uint32_t a_base = base, b_base = base + kStages * kAStage;

  const int4 tile = tiles[blockIdx.x];
  const int4 grp = groups[tile.x];
  const int off = grp.x, rows = grp.y, m0 = tile.y, n0 = tile.z;
  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
  const int gq = lane >> 2, tq = lane & 3;
  const int chunk = tid & 7;  // the 16-byte chunk of each 128-byte row this thread copies

  // Every thread copies the same chunk of 4 A rows and 8 W rows in every stage: their sources once.
  const bf16_bits* a_src[4];
  bool a_ok[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int r = (tid >> 3) + 32 * j;
    a_ok[j] = m0 + r < rows;
    const int64_t p = off + m0 + (a_ok[j] ? r : 0);
    const int64_t src = a_rows ? a_rows[p] / a_div : p;
    a_src[j] = A + src * K + chunk * 8;
  }
  const bf16_bits* w_src[8];
  bool w_ok[8];
  const bf16_bits* Wg = W + static_cast<int64_t>(grp.z) * w_rows * K;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int r = (tid >> 3) + 32 * j;  // tile row 0..255
    int wr;
    if (kSwiGLU) {  // rows 0..127: gate columns n0 + r; 128..255: up columns n0 + r - 128
      const int c = n0 + (r & 127);
      w_ok[j] = c < N;
      wr = (r < 128 ? 0 : N) + (w_ok[j] ? c : 0);
    } else {
      w_ok[j] = n0 + r < N;
      wr = w_ok[j] ? n0 + r : 0;
    }
    w_src[j] = Wg + static_cast<int64_t>(wr) * K + chunk * 8;
  }
  const int n_k = (K + kBK - 1) / kBK;
  auto load = [&](int kt) {
    const int st = kt % kStages, k0 = kt * kBK;
    const bool k_ok = k0 + chunk * 8 < K;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = (tid >> 3) + 32 * j;
      cp_async16(a_base + st * kAStage + swizzle128(r, chunk), a_src[j] + k0, a_ok[j] && k_ok);
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int r = (tid >> 3) + 32 * j;
      cp_async16(b_base + st * kBStage + swizzle128(r, chunk), w_src[j] + k0, w_ok[j] && k_ok);
    }
  };

  float acc[kBN / 2];
#pragma unroll
  for (int i = 0; i < kBN / 2; ++i) acc[i] = 0.f;
  load(0);
  cp_async_commit();
  if (n_k > 1) load(1);
  cp_async_commit();
  for (int kt = 0; kt < n_k; ++kt) {
    cp_async_wait<1>();  // tile kt has landed (kt + 1 may still fly)
    fence_proxy_async();
    __syncthreads();  // and every warpgroup is past the product of tile kt - 2: its stage is free
    if (kt + 2 < n_k) load(kt + 2);
    cp_async_commit();
    const int st = kt % kStages;
    const uint32_t a_tile = a_base + st * kAStage + wg * 64 * 128, b_tile = b_base + st * kBStage;
    fence();
#pragma unroll
    for (int ks = 0; ks < kBK / 16; ++ks)
      Wgmma<kBN>::ss(acc, smem_desc(a_tile + ks * 32), smem_desc(b_tile + ks * 32), 1);
    commit();
    wait<1>();  // tile kt - 1's product is done
  }
  wait<0>();
  pin(acc);
  cp_async_wait<0>();

#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = wg * 64 + warp * 16 + gq + 8 * half;
    if (m0 + r >= rows) continue;
    bf16_bits* crow = C + static_cast<int64_t>(off + m0 + r) * N;
    if (kSwiGLU) {
#pragma unroll
      for (int j = 0; j < kBN / 16; ++j) {
        const int col = n0 + j * 8 + tq * 2;  // N even: both columns or neither
        if (col >= N) continue;
        const float g0 = acc[4 * j + 2 * half], g1 = acc[4 * j + 2 * half + 1];
        const float u0 = acc[4 * (j + kBN / 16) + 2 * half],
                    u1 = acc[4 * (j + kBN / 16) + 2 * half + 1];
        *reinterpret_cast<uint32_t*>(crow + col) =
            pack_bf16(g0 / (1.f + expf(-g0)) * u0, g1 / (1.f + expf(-g1)) * u1);
      }
    } else {
#pragma unroll
      for (int j = 0; j < kBN / 8; ++j) {
        const int col = n0 + j * 8 + tq * 2;
        if (col >= N) continue;
        *reinterpret_cast<uint32_t*>(crow + col) =
            pack_bf16(acc[4 * j + 2 * half], acc[4 * j + 2 * half + 1]);
      }
    }
  }
#endif
}

}  // namespace

bool grouped_gemm_sm90_supported(int K, int N) {
  return K % 8 == 0 && N % 2 == 0 && sm90a_kernels_available();
}

void GroupedGemmPlan::build(const std::vector<int>& rows, const std::vector<int64_t>& row_offset,
                            const std::vector<int64_t>& weight_index, int N, bool swiglu) {
  groups.clear();
  tiles.clear();
  const int cols = swiglu ? kBN / 2 : kBN;
  for (size_t g = 0; g < rows.size(); ++g) {
    if (rows[g] <= 0) continue;
    const int gi = static_cast<int>(groups.size() / 4);
    groups.insert(groups.end(), {static_cast<int32_t>(row_offset[g]), rows[g],
                                 static_cast<int32_t>(weight_index[g]), 0});
    for (int n0 = 0; n0 < N; n0 += cols)
      for (int m0 = 0; m0 < rows[g]; m0 += kBM) tiles.insert(tiles.end(), {gi, m0, n0, 0});
  }
}

void grouped_gemm_sm90(const bf16_bits* A, const int32_t* a_rows, int a_div, const bf16_bits* W,
                       bf16_bits* C, int K, int N, bool swiglu, const GroupedGemmPlan& plan,
                       int32_t* dev_plan, cudaStream_t s) {
  const int ntiles = static_cast<int>(plan.tiles.size() / 4);
  if (ntiles == 0) return;
  // Pageable source: the copy takes the bytes before returning, so the plan may change next call.
  int32_t* dev_groups = dev_plan;
  int32_t* dev_tiles = dev_plan + plan.groups.size();
  CUDA_CHECK(cudaMemcpyAsync(dev_groups, plan.groups.data(), plan.groups.size() * sizeof(int32_t),
                             cudaMemcpyHostToDevice, s));
  CUDA_CHECK(cudaMemcpyAsync(dev_tiles, plan.tiles.data(), plan.tiles.size() * sizeof(int32_t),
                             cudaMemcpyHostToDevice, s));
  const auto* g4 = reinterpret_cast<const int4*>(dev_groups);
  const auto* t4 = reinterpret_cast<const int4*>(dev_tiles);
  if (swiglu) {
    CUDA_CHECK(cudaFuncSetAttribute(grouped_gemm_kernel<true>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
    grouped_gemm_kernel<true>
        <<<ntiles, kThreads, kSmem, s>>>(A, a_rows, a_div, W, C, K, N, 2 * N, g4, t4);
  } else {
    CUDA_CHECK(cudaFuncSetAttribute(grouped_gemm_kernel<false>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
    grouped_gemm_kernel<false>
        <<<ntiles, kThreads, kSmem, s>>>(A, a_rows, a_div, W, C, K, N, N, g4, t4);
  }
  CUDA_CHECK_LAUNCH("grouped_gemm_kernel");
}

}  // namespace sinkscope::cuda::k
