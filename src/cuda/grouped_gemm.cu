// The expert products on Hopper (wgmma, sm_90a): one launch covers every expert of a layer.
//
// A block computes 128 x 256 tiles of the groups' C = A W^T, warp-specialised: one warpgroup
// copies A and W tiles of 64 K-columns into four shared-memory stages (cp.async, 128-byte
// swizzle), two warpgroups multiply, 64 rows each, a m64n256k16 warpgroup product per 16 of K,
// and hand each stage back once its product is done (mbarriers; the copies never wait for the
// products of other stages, the products never wait for copies already in flight). The blocks
// are persistent, one per SM, each taking every gridDim-th tile of the list; the copies run on
// across a block's tiles, so the next tile's first k-tiles land while the current one's last
// products and epilogue run. The tile list is built on the host or on the device from the routing
// counts: for each group, its column tiles, and inside each its row tiles next to each other, so
// blocks that share a weight tile run together and read it once from memory.

// Two things the cuBLAS route does in separate passes happen here in the product itself: A's rows
// may be gathered by index (a_rows[p] / a_div, the routed pairs' tokens), so the gathered copy of
// the inputs is never written; and the gate|up product may finish with SwiGLU: its 256 weight rows
// are 128 gate rows and the 128 matching up rows, so each thread holds gate and up of the same
// columns and writes silu(gate) * up in bf16 (from the fp32 accumulators, no bf16 round trip).
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <vector>

#include "cuda/attention.cuh"  // sm90a_kernels_available
#include "cuda/device_common.cuh"
#include "cuda/grouped_gemm.cuh"
#include "cuda/wgmma.cuh"
#include "sinkscope/error.hpp"

namespace sinkscope::cuda::k {
namespace {

constexpr int kBM = 128, kBN = 256, kBK = 64, kStages = 4, kThreads = 384;
constexpr int kAStage = kBM * kBK * 2, kBStage = kBN * kBK * 2;
constexpr int kSmem = 1024 + kStages * (kAStage + kBStage);

// mbarrier helpers (shared::cta).
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("{\n .reg .b64 state;\n mbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(bar)
               : "memory");
}
// The arrival is made once this thread's earlier cp.async copies have landed (counted in the
// barrier's expected arrivals: .noinc).
__device__ __forceinline__ void mbar_arrive_cp_async(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// Waits for the completion of the barrier's phase of parity `parity`.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n .reg .pred done;\n"
      "WAIT_%=:\n mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      " @!done bra WAIT_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// plan: {ntiles, 0, 0, 0}, then ngroups groups, then the tiles, 4 ints each:
// groups[g] = {row offset of the group in the packed A / C rows, rows, weight index, 0};
// tiles[t] = {group, first row, first column, 0} (columns of C; of act for SwiGLU).
// Warpgroup 0 copies (the producer), warpgroups 1 and 2 multiply 64 rows each (the consumers).
// Stage s is handed over through two barriers: full[s] completes when the producer's 128 threads'
// copies into it have landed, empty[s] when the consumers' 256 threads are past their products
// reading it.
template <bool kSwiGLU>
__global__ void __launch_bounds__(kThreads, 1)
    grouped_gemm_kernel(const bf16_bits* __restrict__ A, const int32_t* __restrict__ a_rows,
                        int a_div, const bf16_bits* __restrict__ W, bf16_bits* __restrict__ C,
                        int K, int N, int w_rows, const int32_t* __restrict__ plan, int ngroups) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace sm90;
  extern __shared__ unsigned char smem_raw[];
  __shared__ __align__(8) uint64_t full_bar[kStages], empty_bar[kStages];
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t base = (raw + 1023u) & ~1023u;
  const uint32_t a_base = base, b_base = base + kStages * kAStage;
  const uint32_t full0 = static_cast<uint32_t>(__cvta_generic_to_shared(full_bar));
  const uint32_t empty0 = static_cast<uint32_t>(__cvta_generic_to_shared(empty_bar));

  const int tid = threadIdx.x, wg = tid >> 7;
  const int n_k = (K + kBK - 1) / kBK;
  const int ntiles = plan[0];
  const int4* groups = reinterpret_cast<const int4*>(plan + 4);
  const int4* tiles = groups + ngroups;
  if (tid == 0) {
    for (int st = 0; st < kStages; ++st) {
      mbar_init(full0 + 8 * st, 128);
      mbar_init(empty0 + 8 * st, 256);
    }
  }
  __syncthreads();

  if (wg == 0) {
    // The producer: thread p copies 16-byte chunk p % 8 of A rows p / 8 + 16 j (8 of them) and of
    // W rows p / 8 + 16 j (16) for every k-tile of the block's tiles, in order; the k-tile count
    // lands in stage count % kStages once the consumers have released the fill before it.
    const int chunk = tid & 7, row0 = tid >> 3;
    const bf16_bits* a_src[8];
    bool a_ok[8];
    const bf16_bits* w_src[16];
    bool w_ok[16];
    int count = 0;
    for (int t = blockIdx.x; t < ntiles; t += gridDim.x) {
      const int4 tile = tiles[t];
      const int4 grp = groups[tile.x];
      const int off = grp.x, rows = grp.y, m0 = tile.y, n0 = tile.z;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int r = row0 + 16 * j;
        a_ok[j] = m0 + r < rows;
        const int64_t p = off + m0 + (a_ok[j] ? r : 0);
        const int64_t src = a_rows ? a_rows[p] / a_div : p;
        a_src[j] = A + src * K + chunk * 8;
      }
      const bf16_bits* Wg = W + static_cast<int64_t>(grp.z) * w_rows * K;
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        const int r = row0 + 16 * j;  // tile row 0..255
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
      for (int kt = 0; kt < n_k; ++kt, ++count) {
        const int st = count % kStages;
        if (count >= kStages) mbar_wait(empty0 + 8 * st, ((count / kStages) & 1) ^ 1);
        const int k0 = kt * kBK;
        const bool k_ok = k0 + chunk * 8 < K;
#pragma unroll
        for (int j = 0; j < 8; ++j)
          cp_async16(a_base + st * kAStage + swizzle128(row0 + 16 * j, chunk), a_src[j] + k0,
                     a_ok[j] && k_ok);
#pragma unroll
        for (int j = 0; j < 16; ++j)
          cp_async16(b_base + st * kBStage + swizzle128(row0 + 16 * j, chunk), w_src[j] + k0,
                     w_ok[j] && k_ok);
        mbar_arrive_cp_async(full0 + 8 * st);
      }
    }
    cp_async_wait<0>();
    return;
  }

  // The consumers: warpgroup 1 rows 0..63 of each tile, warpgroup 2 rows 64..127.
  const int cw = wg - 1, warp = (tid >> 5) & 3, lane = tid & 31;
  const int gq = lane >> 2, tq = lane & 3;
  int count = 0;
  float acc[kBN / 2];
  for (int t = blockIdx.x; t < ntiles; t += gridDim.x) {
#pragma unroll
    for (int i = 0; i < kBN / 2; ++i) acc[i] = 0.f;
    for (int kt = 0; kt < n_k; ++kt, ++count) {
      const int st = count % kStages;
      mbar_wait(full0 + 8 * st, (count / kStages) & 1);
      fence_proxy_async();  // the copies (generic proxy) before wgmma's reads (async proxy)
      const uint32_t a_tile = a_base + st * kAStage + cw * 64 * 128, b_tile = b_base + st * kBStage;
      fence();
#pragma unroll
      for (int ks = 0; ks < kBK / 16; ++ks)
        Wgmma<kBN>::ss(acc, smem_desc(a_tile + ks * 32), smem_desc(b_tile + ks * 32), 1);
      commit();
      wait<1>();  // the product of k-tile count - 1 is done: its stage goes back to the producer
      if (kt > 0) mbar_arrive(empty0 + 8 * ((count - 1) % kStages));
    }
    wait<0>();
    pin(acc);
    mbar_arrive(empty0 + 8 * ((count - 1) % kStages));

    const int4 tile = tiles[t];
    const int4 grp = groups[tile.x];
    const int off = grp.x, rows = grp.y, m0 = tile.y, n0 = tile.z;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = cw * 64 + warp * 16 + gq + 8 * half;
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
  }
#endif
}

// One block: expert e's rows are counts[e] (groups are the experts, weight index e), its row
// offset the exclusive scan of the counts; its tiles follow those of experts below it, column
// tiles outer and row tiles inner (GroupedGemmPlan::build's order).
constexpr int kPlanThreads = 1024;

__global__ void __launch_bounds__(kPlanThreads)
    device_plan_kernel(const int32_t* __restrict__ counts, int E, int N, int cols,
                       int32_t* __restrict__ offsets, int32_t* __restrict__ plan) {
  using Scan = cub::BlockScan<int32_t, kPlanThreads>;
  __shared__ typename Scan::TempStorage scratch;
  const int e = threadIdx.x;
  const int32_t c = e < E ? counts[e] : 0;
  const int mt = (c + kBM - 1) / kBM, nct = (N + cols - 1) / cols;
  int32_t off = 0, first = 0, total = 0;
  Scan(scratch).ExclusiveSum(c, off);
  __syncthreads();
  Scan(scratch).ExclusiveSum(mt * nct, first, total);
  if (e == 0) {
    plan[0] = total;
    plan[1] = plan[2] = plan[3] = 0;
  }
  if (e >= E) return;
  if (offsets) offsets[e] = off;
  int4* groups = reinterpret_cast<int4*>(plan + 4);
  groups[e] = make_int4(off, c, e, 0);
  int4* tiles = groups + E + first;
  for (int j = 0; j < nct; ++j)
    for (int i = 0; i < mt; ++i) tiles[j * mt + i] = make_int4(e, i * kBM, j * cols, 0);
}

void launch(const bf16_bits* A, const int32_t* a_rows, int a_div, const bf16_bits* W, bf16_bits* C,
            int K, int N, bool swiglu, const int32_t* plan, int ngroups, int grid, cudaStream_t s) {
  auto go = [&](auto kernel) {
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
    kernel<<<grid, kThreads, kSmem, s>>>(A, a_rows, a_div, W, C, K, N, swiglu ? 2 * N : N, plan,
                                         ngroups);
  };
  swiglu ? go(grouped_gemm_kernel<true>) : go(grouped_gemm_kernel<false>);
  CUDA_CHECK_LAUNCH("grouped_gemm_kernel");
}

int sm_count() {
  int device = 0, sms = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return std::max(sms, 1);
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
  std::vector<int32_t> all{ntiles, 0, 0, 0};
  all.insert(all.end(), plan.groups.begin(), plan.groups.end());
  all.insert(all.end(), plan.tiles.begin(), plan.tiles.end());
  CUDA_CHECK(cudaMemcpyAsync(dev_plan, all.data(), all.size() * sizeof(int32_t),
                             cudaMemcpyHostToDevice, s));
  launch(A, a_rows, a_div, W, C, K, N, swiglu, dev_plan, static_cast<int>(plan.groups.size() / 4),
         std::min(ntiles, sm_count()), s);  // one persistent block per SM
}

int64_t grouped_gemm_device_plan_ints(int64_t npairs, int E, int N, bool swiglu) {
  const int cols = swiglu ? kBN / 2 : kBN;
  const int64_t row_tiles = (npairs + kBM - 1) / kBM + E;  // sum of ceil(c_e / kBM) at most
  return 4 + 4 * static_cast<int64_t>(E) + 4 * row_tiles * ((N + cols - 1) / cols);
}

void grouped_gemm_device_plan(const int32_t* counts, int E, int N, bool swiglu, int32_t* offsets,
                              int32_t* dev_plan, cudaStream_t s) {
  if (E > kPlanThreads) throw RuntimeFailure("grouped_gemm_device_plan: more than 1024 experts");
  device_plan_kernel<<<1, kPlanThreads, 0, s>>>(counts, E, N, swiglu ? kBN / 2 : kBN, offsets,
                                                dev_plan);
  CUDA_CHECK_LAUNCH("device_plan_kernel");
}

void grouped_gemm_sm90_device_plan(const bf16_bits* A, const int32_t* a_rows, int a_div,
                                   const bf16_bits* W, bf16_bits* C, int K, int N, bool swiglu,
                                   const int32_t* dev_plan, int E, cudaStream_t s) {
  launch(A, a_rows, a_div, W, C, K, N, swiglu, dev_plan, E, sm_count(), s);
}

}  // namespace sinkscope::cuda::k
