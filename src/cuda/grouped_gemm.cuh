// Host launchers of grouped_gemm.cu (see kernels.cuh for the conventions shared by every launcher:
// plain pointers, bf16 as bf16_bits, stream order, empty sizes do nothing, launch errors throw).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "cuda/device_buffer.hpp"

namespace sinkscope::cuda::k {

// The rows of one tile of the expert products (a group's rows are cut into row tiles of this many).
constexpr int kGroupedTileRows = 128;

// The expert products in one launch each on Hopper (wgmma; sm_90a builds on compute capability
// 9.0): for every group g with rows[g] > 0, packed rows p = row_offset[g] + r (r < rows[g]):
//   store:  C[p, 0:N] = A[src(p), 0:K] W_g[0:N, 0:K]^T                      (W_g = W + w_g N K)
//   swiglu: C[p, 0:N] = silu(A[src(p)] W_g[0:N]^T) * (A[src(p)] W_g[N:2N]^T)   (W_g = W + w_g 2N K)
// with src(p) = a_rows ? a_rows[p] / a_div : p (rows gathered by index), bf16 in and out, fp32
// accumulation. Needs K % 8 == 0 and N even. The tile list is built on the host
// (GroupedGemmPlan, uploaded to dev_plan, which holds plan.ints() ints) or on the device from
// per-expert counts (grouped_gemm_device_plan), so the routing needs no round trip to the host.
// A distinct dev_plan buffer per product that is in flight.
bool grouped_gemm_sm90_supported(int K, int N);
struct GroupedGemmPlan {
  std::vector<int32_t> groups, tiles;  // 4 ints each: see grouped_gemm.cu
  void build(const std::vector<int>& rows, const std::vector<int64_t>& row_offset,
             const std::vector<int64_t>& weight_index, int N, bool swiglu);
  size_t ints() const { return 4 + groups.size() + tiles.size(); }
};
void grouped_gemm_sm90(const bf16_bits* A, const int32_t* a_rows, int a_div, const bf16_bits* W,
                       bf16_bits* C, int K, int N, bool swiglu, const GroupedGemmPlan& plan,
                       int32_t* dev_plan, cudaStream_t s);

// The plan of one product built on the device: the groups are the E experts (rows counts[e],
// weight index e, row offset the exclusive scan of counts, also written to offsets when not
// null), the tiles in GroupedGemmPlan::build's order; expert e's first row tile (the exclusive
// scan of ceil(counts / 128)) goes to tile_base[e] when not null. dev_plan holds
// grouped_gemm_device_plan_ints(npairs, E, N, swiglu) ints for counts summing to npairs at most.
// E <= 1024.
int64_t grouped_gemm_device_plan_ints(int64_t npairs, int E, int N, bool swiglu);
void grouped_gemm_device_plan(const int32_t* counts, int E, int N, bool swiglu, int32_t* offsets,
                              int32_t* tile_base, int32_t* dev_plan, cudaStream_t s);

// The recording's per-expert sums in the down product's epilogue (docs/metrics.md's expert rest
// means), so the expert outputs are not read again: for each 128-row tile of C (row tile g: its
// expert's tile_base + its first row / 128) and each probe b among its rows, the sum over the rows
// p whose token pos_tok[p] (absolute, b T + i) has i >= 1 of row_w[p] * C[p, col] (the stored bf16
// value) goes to part[(g B + b) N + col]; entries of probes a tile has no rows of are not written.
// expert_rest_sums_from_tiles (moe_kernels.cuh) adds each (expert, probe)'s tiles in order. part
// holds rest_tap_floats(npairs, E, B, N) floats. Deterministic: no atomics.
struct RestTap {
  const float* row_w = nullptr;
  const int32_t* pos_tok = nullptr;
  int T = 0, B = 0;
  float* part = nullptr;  // null: no tap
};
int64_t rest_tap_floats(int64_t npairs, int E, int B, int N);

// rows: the packed rows A holds when a_rows is null (at least the counts' sum). A rest tap only
// on the down product (swiglu false).
void grouped_gemm_sm90_device_plan(const bf16_bits* A, const int32_t* a_rows, int a_div,
                                   int64_t rows, const bf16_bits* W, bf16_bits* C, int K, int N,
                                   bool swiglu, const int32_t* dev_plan, int E, cudaStream_t s,
                                   const RestTap& tap = RestTap{});

}  // namespace sinkscope::cuda::k
