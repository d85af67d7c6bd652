// The expert products on Hopper (wgmma, sm_90a): one launch covers every expert of a layer.
//
// A block computes 128 x 256 tiles of the groups' C = A W^T, warp-specialised: one warpgroup
// copies A and W tiles of 64 K-columns into four shared-memory stages (128-byte swizzle): the W
// tile as two TMA boxes, the A tile as one where its rows are contiguous, else with cp.async (rows
// gathered by index); two warpgroups multiply, 64 rows each, a m64n256k16 warpgroup product per
// 16 of K, and hand each stage back once its product is done (mbarriers; the copies never wait
// for the products of other stages, the products never wait for copies already in flight). The
// blocks are persistent, one per SM, each taking every gridDim-th tile of the list; the copies run
// on across a block's tiles, so the next tile's first k-tiles land while the current one's last
// products and epilogue run. The tile list is built on the host or on the device from the routing
// counts: for each group, its column tiles, and inside each its row tiles next to each other, so
// blocks that share a weight tile run together and read it once from memory. (Issuing the W tile's
// copies with TMA rather than 16 cp.async per producer thread made the products 9% faster on an
// H200; docs/results/2026-12-01-forward-h200.md.) The epilogue writes C through a small staging
// area in shared memory (store_rows), so its stores are whole 128-byte lines: the down product at
// 1 x 32768 went from 2.17 to 1.66 ms a layer (base clocks), its L2 write requests from 100 to 13
// million (docs/results/2026-12-01-recording-h200-3.md).

// Two things the cuBLAS route does in separate passes happen here in the product itself: A's rows
// may be gathered by index (a_rows[p] / a_div, the routed pairs' tokens), so the gathered copy of
// the inputs is never written; and the gate|up product may finish with SwiGLU: its 256 weight rows
// are 128 gate rows and the 128 matching up rows, so each thread holds gate and up of the same
// columns and writes silu(gate) * up in bf16 (from the fp32 accumulators, no bf16 round trip).
// The down product may also sum its stored rows per probe for the recording (RestTap,
// grouped_gemm.cuh), so the expert outputs are not read a second time.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/attention.cuh"  // sm90a_kernels_available
#include "cuda/device_common.cuh"
#include "cuda/grouped_gemm.cuh"
#include "cuda/wgmma.cuh"
#include "sinkscope/error.hpp"

namespace sinkscope::cuda::k {
namespace {

constexpr int kBM = kGroupedTileRows, kBN = 256, kBK = 64, kStages = 4, kThreads = 384;
constexpr int kAStage = kBM * kBK * 2, kBStage = kBN * kBK * 2;
// The rest sums' cross-warp step: the 8 consumer warps' column sums of a tile, 256 floats each.
constexpr int kRedBytes = 8 * kBN * 4;
// The epilogue's staging rows: 16 rows x kStageCols bf16 for each of the 8 consumer warps.
constexpr int kStageCols = 64, kStageWarpBytes = 16 * kStageCols * 2;
constexpr int kSmem = 1024 + kStages * (kAStage + kBStage) + kRedBytes + 8 * kStageWarpBytes;

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

// One arrival that also expects `bytes` more of asynchronous (TMA) copies in this phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
// A box of a tensor map (64 K-columns x 128 rows at (k0, row)) into dst, `bar` counting its bytes.
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap* map, int k0, int row,
                                         uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, "
      "%3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(k0), "r"(row), "r"(bar)
      : "memory");
}

// The 256 consumer threads only (the producer warpgroup has left or is copying).
__device__ __forceinline__ void consumers_sync() {
  asm volatile("bar.sync 1, 256;\n" ::: "memory");
}

// A warp's 16 rows x 64 columns of a tile to C, through its staging rows `st` in shared memory:
// v[h][jj] is the bf16 pair of row gq + 8 h, columns c0 + 8 jj + 2 tq (the accumulators' layout).
// Stored from the fragments, each instruction would write 16 bytes of 8 rows (half a sector each,
// a write request per row); staged, 8 lanes write a row's 128 bytes, so an instruction writes four
// whole lines. The 16-byte column chunks are XOR-swizzled by row, so neither the fragments' writes
// nor the rows' reads meet a bank twice. Rows from `rows_left` on are past the group; columns from
// N on past C.
__device__ __forceinline__ void store_rows(unsigned char* st, const uint32_t (&v)[2][8],
                                           bf16_bits* c_rows, int rows_left, int c0, int N,
                                           int lane) {
  const int gq = lane >> 2, tq = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int jj = 0; jj < 8; ++jj)
      *reinterpret_cast<uint32_t*>(st + (gq + 8 * h) * 128 + ((jj ^ gq) << 4) + tq * 4) = v[h][jj];
  __syncwarp();
  const int ck = lane & 7, col = c0 + ck * 8;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = (lane >> 3) + 4 * i;
    const uint4 q = *reinterpret_cast<const uint4*>(st + r * 128 + ((ck ^ (r & 7)) << 4));
    if (r >= rows_left || col >= N) continue;
    bf16_bits* dst = c_rows + static_cast<int64_t>(r) * N + col;
    if ((N & 7) == 0) {
      *reinterpret_cast<uint4*>(dst) = q;
    } else {  // N even: whole pairs, 4-byte aligned
      const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
      for (int p = 0; p < 4; ++p)
        if (col + 2 * p < N) *reinterpret_cast<uint32_t*>(dst + 2 * p) = w[p];
    }
  }
  __syncwarp();  // the staging rows are written again by the next chunk
}

// The rest sums of one tile (RestTap, grouped_gemm.cuh), after its C rows are stored: for each
// probe b among the tile's rows, each thread weighs its two rows' stored (bf16) values by row_w, or
// 0 where the row is not b's position 1..T-1 or past the group; the warp's 16 rows are summed by a
// transposing butterfly over the 8 lanes that share columns (each step hands half of the values to
// the partner lane: 32 + 16 + 8 shuffles, after which a lane holds 8 columns' sums), then the 8
// consumer warps' sums meet in shared memory and thread t adds column t's in warp order. No
// atomics: the same inputs give the same sums.
// What the rest tap needs of a tile's rows: the tokens and weights of this thread's two rows (token
// -1 past the group) and the tokens of the tile's first and last rows (their probes). The loads are
// issued once the tile's first products are, and nothing is computed from them before the
// epilogue, so their latency hides behind the products.
struct TapRows {
  int tok[2], tok_lo, tok_hi;
  float rw[2];
};
__device__ __forceinline__ TapRows tap_rows(const RestTap& tap, int off, int rows, int m0, int cw,
                                            int warp, int lane) {
  TapRows tr;
  const int last = min(rows, m0 + kBM) - 1;
  tr.tok_lo = tap.pos_tok[off + m0];
  tr.tok_hi = tap.pos_tok[off + last];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = m0 + cw * 64 + warp * 16 + (lane >> 2) + 8 * half;
    tr.tok[half] = r < rows ? tap.pos_tok[off + r] : -1;
    tr.rw[half] = r < rows ? tap.row_w[off + r] : 0.f;
  }
  return tr;
}

// q = t / T and r = t % T (0 <= t, 1 <= T): a float estimate (relative error below 2^-21, so
// within one of q while q < 2^20) corrected in integers; no integer division.
__device__ __forceinline__ int probe_of(int t, int T, float inv_T, int& r) {
  int q = __float2int_rz(__int2float_rz(t) * inv_T);
  r = t - q * T;
  while (r < 0) --q, r += T;
  while (r >= T) ++q, r -= T;
  return q;
}

// acc holds the tile's values already rounded to bf16 (the stored values).
__device__ __forceinline__ void rest_tap_tile(const RestTap& tap, const TapRows& tr,
                                              const float (&acc)[kBN / 2], int tile_base, int m0,
                                              int n0, int N, int cw, int warp, int lane,
                                              float* red) {
  const int tq = lane & 3, tc = (cw * 4 + warp) * 32 + lane;  // 0..255
  // The tile's row tile: the group's first row tile (its 4th plan int) + m0 / kBM.
  const int64_t g = tile_base + m0 / kBM;
  const float inv_T = 1.f / static_cast<float>(tap.T);
  int r = 0, rb[2], ri[2];
  const int b_lo = probe_of(tr.tok_lo, tap.T, inv_T, r),
            b_hi = probe_of(tr.tok_hi, tap.T, inv_T, r);
#pragma unroll
  for (int half = 0; half < 2; ++half)
    rb[half] = tr.tok[half] >= 0 ? probe_of(tr.tok[half], tap.T, inv_T, ri[half]) : -1;
  for (int b = b_lo; b <= b_hi; ++b) {
    float w[2];
#pragma unroll
    for (int half = 0; half < 2; ++half)
      w[half] = rb[half] == b && ri[half] != 0 ? tr.rw[half] : 0.f;
    // Value i (i < 64): column (i / 2) * 8 + 2 tq + i % 2, both rows weighed by w; taken in two
    // halves of 32 (registers: acc stays live across the probes).
    auto value = [&](int i) {
      const int j = i >> 1, c = i & 1;
      return w[0] * acc[4 * j + c] + w[1] * acc[4 * j + 2 + c];
    };
    float* mine = red + (cw * 4 + warp) * kBN;
#pragma unroll
    for (int hc = 0; hc < 2; ++hc) {
      float v[16];
      {  // lane bit 4, formed from acc as it goes
        const int bit = (lane >> 4) & 1;
#pragma unroll
        for (int i = 0; i < 16; ++i) {
          const float lo = value(32 * hc + i), hi = value(32 * hc + i + 16);
          v[i] = (bit ? hi : lo) + __shfl_xor_sync(0xffffffffu, bit ? lo : hi, 16);
        }
      }
      // Then lane bits 3 and 2: keep the half named by the bit, add the partner's other half.
      auto fold = [&](auto width_c, int bit_pos) {
        constexpr int width = decltype(width_c)::value;
        const int bit = (lane >> bit_pos) & 1;
#pragma unroll
        for (int i = 0; i < width; ++i) {
          const float keep = bit ? v[i + width] : v[i], give = bit ? v[i] : v[i + width];
          v[i] = keep + __shfl_xor_sync(0xffffffffu, give, 1 << bit_pos);
        }
      };
      fold(std::integral_constant<int, 8>{}, 3);
      fold(std::integral_constant<int, 4>{}, 2);
      // v[i], i < 4: value 32 hc + 16 b4 + 8 b3 + 4 b2 + i, i.e. column (that / 2) * 8 + 2 tq + i
      // % 2.
      const int first =
          16 * hc + ((lane >> 4) & 1) * 8 + ((lane >> 3) & 1) * 4 + ((lane >> 2) & 1) * 2;
#pragma unroll
      for (int i = 0; i < 4; ++i) mine[(first + i / 2) * 8 + 2 * tq + (i & 1)] = v[i];
    }
    consumers_sync();
    float sum = 0.f;
#pragma unroll
    for (int wq = 0; wq < 8; ++wq) sum += red[wq * kBN + tc];
    if (n0 + tc < N) tap.part[(g * tap.B + b) * N + n0 + tc] = sum;
    consumers_sync();  // red is written again by the next probe or tile
  }
}

// plan: {ntiles, 0, 0, 0}, then ngroups groups, then the tiles, 4 ints each:
// groups[g] = {row offset of the group in the packed A / C rows, rows, weight index, first row
// tile} (the row tiles of the groups before it: the rest tap's index of the group's tiles);
// tiles[t] = {group, first row, first column, 0} (columns of C; of act for SwiGLU).
// W's rows are those of wmap; with kTmaA (A's rows not gathered) A's rows those of amap (both
// [rows, K] bf16 maps of 64 x 128 boxes in the 128-byte swizzle). Warpgroup 0 copies (the
// producer), warpgroups 1 and 2 multiply 64 rows each (the consumers). Stage s is handed over
// through two barriers: full[s] completes when its copies have landed (the TMA bytes, and with
// gathered A rows the cp.async copies of the producer's 128 threads), empty[s] when the consumers'
// 256 threads are past their products reading it.
template <bool kSwiGLU, bool kTmaA>
__global__ void __launch_bounds__(kThreads, 1)
    grouped_gemm_kernel(const bf16_bits* __restrict__ A, const int32_t* __restrict__ a_rows,
                        int a_div, const __grid_constant__ CUtensorMap amap,
                        const __grid_constant__ CUtensorMap wmap, bf16_bits* __restrict__ C, int K,
                        int N, int w_rows, const int32_t* __restrict__ plan, int ngroups,
                        RestTap tap) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace sm90;
  extern __shared__ unsigned char smem_raw[];
  __shared__ __align__(8) uint64_t full_bar[kStages], empty_bar[kStages];
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t base = (raw + 1023u) & ~1023u;
  const uint32_t a_base = base, b_base = base + kStages * kAStage;
  float* red = reinterpret_cast<float*>(smem_raw + (base - raw) + kStages * (kAStage + kBStage));
  unsigned char* stage_rows = reinterpret_cast<unsigned char*>(red) + kRedBytes;
  const uint32_t full0 = static_cast<uint32_t>(__cvta_generic_to_shared(full_bar));
  const uint32_t empty0 = static_cast<uint32_t>(__cvta_generic_to_shared(empty_bar));

  const int tid = threadIdx.x, wg = tid >> 7;
  const int n_k = (K + kBK - 1) / kBK;
  const int ntiles = plan[0];
  const int4* groups = reinterpret_cast<const int4*>(plan + 4);
  const int4* tiles = groups + ngroups;
  if (tid == 0) {
    for (int st = 0; st < kStages; ++st) {
      // The expect_tx arrival of thread 0, and the A copies of the 128 producer threads.
      mbar_init(full0 + 8 * st, kTmaA ? 1 : 1 + 128);
      mbar_init(empty0 + 8 * st, 256);
    }
  }
  __syncthreads();

  if (wg == 0) {
    // The producer, for every k-tile of the block's tiles in order (k-tile count lands in stage
    // count % kStages once the consumers have released the fill before it): thread 0 copies the
    // W tile as two TMA boxes of 128 rows (gate and up rows for SwiGLU; rows past N read the next
    // rows or the map's zero fill and reach only columns the epilogue does not store), and A's
    // tile as one box when its rows are not gathered; else thread p copies 16-byte chunk p % 8
    // of A rows p / 8 + 16 j (8 of them) with cp.async.
    // The copies need few registers: hand most of them to the consumers (setmaxnreg below).
    asm volatile("setmaxnreg.dec.sync.aligned.u32 56;\n" ::: "memory");
    if (kTmaA && tid != 0) return;
    const int chunk = tid & 7, row0 = tid >> 3;
    const bf16_bits* a_src[8];
    bool a_ok[8];
    int count = 0;
    for (int t = blockIdx.x; t < ntiles; t += gridDim.x) {
      const int4 tile = tiles[t];
      const int4 grp = groups[tile.x];
      const int off = grp.x, rows = grp.y, m0 = tile.y, n0 = tile.z;
      if (!kTmaA) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int r = row0 + 16 * j;
          a_ok[j] = m0 + r < rows;
          const int64_t p = off + m0 + (a_ok[j] ? r : 0);
          const int64_t src = a_rows ? a_rows[p] / a_div : p;
          a_src[j] = A + src * K + chunk * 8;
        }
      }
      const int w0 = grp.z * w_rows + n0, w1 = w0 + (kSwiGLU ? N : 128);
      for (int kt = 0; kt < n_k; ++kt, ++count) {
        const int st = count % kStages;
        if (count >= kStages) mbar_wait(empty0 + 8 * st, ((count / kStages) & 1) ^ 1);
        const int k0 = kt * kBK;
        const uint32_t full = full0 + 8 * st;
        if (tid == 0) {
          mbar_arrive_expect_tx(full, kBStage + (kTmaA ? kAStage : 0));
          tma_load(b_base + st * kBStage, &wmap, k0, w0, full);
          tma_load(b_base + st * kBStage + kBStage / 2, &wmap, k0, w1, full);
          if (kTmaA) tma_load(a_base + st * kAStage, &amap, k0, off + m0, full);
        }
        if (!kTmaA) {
          const bool k_ok = k0 + chunk * 8 < K;
#pragma unroll
          for (int j = 0; j < 8; ++j)
            cp_async16(a_base + st * kAStage + swizzle128(row0 + 16 * j, chunk), a_src[j] + k0,
                       a_ok[j] && k_ok);
          mbar_arrive_cp_async(full);
        }
      }
    }
    if (!kTmaA) cp_async_wait<0>();
    return;
  }

  // The consumers: warpgroup 1 rows 0..63 of each tile, warpgroup 2 rows 64..127.
  // 224 registers a thread (128 x 56 + 256 x 224 <= 64K): the accumulators and the rest tap.
  asm volatile("setmaxnreg.inc.sync.aligned.u32 224;\n" ::: "memory");
  const int cw = wg - 1, warp = (tid >> 5) & 3, lane = tid & 31;
  int count = 0;
  float acc[kBN / 2];
  // Each tile's description is read a tile ahead (the tile during the products before it, its
  // group before that tile's epilogue), and the rest tap's rows when the tile starts: the loads
  // are in flight while products run, never waited for between tiles.
  const bool tapped = !kSwiGLU && tap.part != nullptr;
  int4 tile_next = make_int4(0, 0, 0, 0), grp_next = make_int4(0, 0, 0, 0);
  if (blockIdx.x < ntiles) {
    tile_next = tiles[blockIdx.x];
    grp_next = groups[tile_next.x];
  }
  for (int t = blockIdx.x; t < ntiles; t += gridDim.x) {
    const int4 tile = tile_next, grp = grp_next;
    const int off = grp.x, rows = grp.y, m0 = tile.y, n0 = tile.z;
    TapRows tr{};
    const bool more = t + static_cast<int>(gridDim.x) < ntiles;
    if (more) tile_next = tiles[t + gridDim.x];
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
      if (tapped && kt == 0) tr = tap_rows(tap, off, rows, m0, cw, warp, lane);
      wait<1>();  // the product of k-tile count - 1 is done: its stage goes back to the producer
      if (kt > 0) mbar_arrive(empty0 + 8 * ((count - 1) % kStages));
    }
    wait<0>();
    pin(acc);
    mbar_arrive(empty0 + 8 * ((count - 1) % kStages));
    if (more) grp_next = groups[tile_next.x];
    // The tile's values go out 64 columns at a time through the warp's staging rows (store_rows).
    // SwiGLU: column j of act pairs gate column j with up column j + kBN / 2.
    const int wrow = m0 + cw * 64 + warp * 16;  // the warp's first row in the group
    bf16_bits* const cw0 = C + static_cast<int64_t>(off + wrow) * N;
    constexpr int kChunks = (kSwiGLU ? kBN / 2 : kBN) / kStageCols;
#pragma unroll
    for (int ch = 0; ch < kChunks; ++ch) {
      uint32_t v[2][8];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
#pragma unroll
        for (int jj = 0; jj < 8; ++jj) {
          const int j = ch * 8 + jj, i = 4 * j + 2 * half;
          if (kSwiGLU) {
            const float g0 = acc[i], g1 = acc[i + 1];
            const float u0 = acc[i + kBN / 4],
                        u1 = acc[i + kBN / 4 + 1];  // 4 (j + kBN / 16) + 2 half
            v[half][jj] = pack_bf16(g0 / (1.f + expf(-g0)) * u0, g1 / (1.f + expf(-g1)) * u1);
          } else {
            v[half][jj] = pack_bf16(acc[i], acc[i + 1]);
            if (tapped) {  // each pair rounded once: stored, and left in acc as the tap's values
              acc[i] = __uint_as_float(v[half][jj] << 16);
              acc[i + 1] = __uint_as_float(v[half][jj] & 0xffff0000u);
            }
          }
        }
      }
      store_rows(stage_rows + (cw * 4 + warp) * kStageWarpBytes, v, cw0, rows - wrow,
                 n0 + ch * kStageCols, N, lane);
    }
    if (tapped) rest_tap_tile(tap, tr, acc, grp.w, m0, n0, N, cw, warp, lane, red);
  }
#endif
}

// One block: expert e's rows are counts[e] (groups are the experts, weight index e), its row
// offset the exclusive scan of the counts; its tiles follow those of experts below it, column
// tiles outer and row tiles inner (GroupedGemmPlan::build's order).
constexpr int kPlanThreads = 1024;

__global__ void __launch_bounds__(kPlanThreads)
    device_plan_kernel(const int32_t* __restrict__ counts, int E, int N, int cols,
                       int32_t* __restrict__ offsets, int32_t* __restrict__ tile_base,
                       int32_t* __restrict__ plan) {
  using Scan = cub::BlockScan<int32_t, kPlanThreads>;
  __shared__ typename Scan::TempStorage scratch;
  const int e = threadIdx.x;
  const int32_t c = e < E ? counts[e] : 0;
  const int mt = (c + kBM - 1) / kBM, nct = (N + cols - 1) / cols;
  int32_t off = 0, first = 0, total = 0, row_tile = 0;
  Scan(scratch).ExclusiveSum(c, off);
  __syncthreads();
  Scan(scratch).ExclusiveSum(mt, row_tile);
  __syncthreads();
  Scan(scratch).ExclusiveSum(mt * nct, first, total);
  if (e == 0) {
    plan[0] = total;
    plan[1] = plan[2] = plan[3] = 0;
  }
  if (e >= E) return;
  if (offsets) offsets[e] = off;
  if (tile_base) tile_base[e] = row_tile;
  int4* groups = reinterpret_cast<int4*>(plan + 4);
  groups[e] = make_int4(off, c, e, row_tile);
  int4* tiles = groups + E + first;
  for (int j = 0; j < nct; ++j)
    for (int i = 0; i < mt; ++i) tiles[j * mt + i] = make_int4(e, i * kBM, j * cols, 0);
}

// A [rows, K] bf16 operand as a TMA map of 64 x 128 boxes in the 128-byte swizzle (the layout the
// products read; out-of-range boxes are zero-filled); cuTensorMapEncodeTiled is a host-only call,
// fetched from the driver once (the runtime links no driver library).
CUtensorMap tensor_map(const bf16_bits* X, int64_t rows, int K) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                                cudaEnableDefault, &found));
    if (found != cudaDriverEntryPointSuccess || !fn)
      throw RuntimeFailure("the CUDA driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  CUtensorMap map{};
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(K), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(K) * sizeof(bf16_bits)};
  const cuuint32_t box[2] = {kBK, 128}, elem[2] = {1, 1};
  const CUresult r =
      encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<bf16_bits*>(X), dims, strides,
             box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
             CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw RuntimeFailure("cuTensorMapEncodeTiled failed (" + std::to_string(static_cast<int>(r)) +
                         ") for a " + std::to_string(rows) + " x " + std::to_string(K) +
                         " expert operand");
  return map;
}

// One persistent block per SM at most, `grid` blocks. A's rows are gathered (a_rows) or, when
// not, read through a tensor map of its a_total rows.
void launch(const bf16_bits* A, const int32_t* a_rows, int a_div, int64_t a_total,
            const bf16_bits* W, int64_t w_total, bf16_bits* C, int K, int N, bool swiglu,
            const int32_t* plan, int ngroups, int grid, const RestTap& tap, cudaStream_t s) {
  const CUtensorMap wmap = tensor_map(W, w_total, K);
  const CUtensorMap amap = a_rows ? CUtensorMap{} : tensor_map(A, a_total, K);
  auto go = [&](auto kernel) {
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
    kernel<<<grid, kThreads, kSmem, s>>>(A, a_rows, a_div, amap, wmap, C, K, N, swiglu ? 2 * N : N,
                                         plan, ngroups, tap);
  };
  if (a_rows)
    swiglu ? go(grouped_gemm_kernel<true, false>) : go(grouped_gemm_kernel<false, false>);
  else
    swiglu ? go(grouped_gemm_kernel<true, true>) : go(grouped_gemm_kernel<false, true>);
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
  int32_t row_tiles = 0;
  for (size_t g = 0; g < rows.size(); ++g) {
    if (rows[g] <= 0) continue;
    const int gi = static_cast<int>(groups.size() / 4);
    groups.insert(groups.end(), {static_cast<int32_t>(row_offset[g]), rows[g],
                                 static_cast<int32_t>(weight_index[g]), row_tiles});
    row_tiles += (rows[g] + kBM - 1) / kBM;
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
  int weights = 0;  // the weight matrices the tensor map covers
  for (size_t g = 2; g < plan.groups.size(); g += 4)
    weights = std::max(weights, plan.groups[g] + 1);
  int64_t a_total = 0;  // the packed rows (A's rows when not gathered)
  for (size_t g = 0; g + 1 < plan.groups.size(); g += 4)
    a_total = std::max<int64_t>(a_total, int64_t{plan.groups[g]} + plan.groups[g + 1]);
  launch(A, a_rows, a_div, a_total, W, static_cast<int64_t>(weights) * (swiglu ? 2 * N : N), C, K,
         N, swiglu, dev_plan, static_cast<int>(plan.groups.size() / 4),
         std::min(ntiles, sm_count()), RestTap{}, s);
}

int64_t grouped_gemm_device_plan_ints(int64_t npairs, int E, int N, bool swiglu) {
  const int cols = swiglu ? kBN / 2 : kBN;
  const int64_t row_tiles = (npairs + kBM - 1) / kBM + E;  // sum of ceil(c_e / kBM) at most
  return 4 + 4 * static_cast<int64_t>(E) + 4 * row_tiles * ((N + cols - 1) / cols);
}

void grouped_gemm_device_plan(const int32_t* counts, int E, int N, bool swiglu, int32_t* offsets,
                              int32_t* tile_base, int32_t* dev_plan, cudaStream_t s) {
  if (E > kPlanThreads) throw RuntimeFailure("grouped_gemm_device_plan: more than 1024 experts");
  device_plan_kernel<<<1, kPlanThreads, 0, s>>>(counts, E, N, swiglu ? kBN / 2 : kBN, offsets,
                                                tile_base, dev_plan);
  CUDA_CHECK_LAUNCH("device_plan_kernel");
}

void grouped_gemm_sm90_device_plan(const bf16_bits* A, const int32_t* a_rows, int a_div,
                                   int64_t rows, const bf16_bits* W, bf16_bits* C, int K, int N,
                                   bool swiglu, const int32_t* dev_plan, int E, cudaStream_t s,
                                   const RestTap& tap) {
  if (tap.part && (swiglu || !tap.row_w || !tap.pos_tok || tap.T < 1 || tap.B < 1))
    throw RuntimeFailure(
        "grouped_gemm_sm90_device_plan: a rest tap needs the down product, row "
        "weights, tokens, T and B");
  launch(A, a_rows, a_div, rows, W, static_cast<int64_t>(E) * (swiglu ? 2 * N : N), C, K, N, swiglu,
         dev_plan, E, sm_count(), tap, s);
}

int64_t rest_tap_floats(int64_t npairs, int E, int B, int N) {
  return ((npairs + kBM - 1) / kBM + E) * B * N;  // sum of ceil(c_e / kBM) <= npairs / kBM + E
}

}  // namespace sinkscope::cuda::k
