// Host launchers of grouped_gemm.cu (see kernels.cuh for the conventions shared by every launcher:
// plain pointers, bf16 as bf16_bits, stream order, empty sizes do nothing, launch errors throw).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "cuda/device_buffer.hpp"

namespace sinkscope::cuda::k {

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
// null), the tiles in GroupedGemmPlan::build's order; dev_plan holds
// grouped_gemm_device_plan_ints(npairs, E, N, swiglu) ints for counts summing to npairs at most.
// E <= 1024.
int64_t grouped_gemm_device_plan_ints(int64_t npairs, int E, int N, bool swiglu);
void grouped_gemm_device_plan(const int32_t* counts, int E, int N, bool swiglu, int32_t* offsets,
                              int32_t* dev_plan, cudaStream_t s);
// rows: the packed rows A holds when a_rows is null (at least the counts' sum).
void grouped_gemm_sm90_device_plan(const bf16_bits* A, const int32_t* a_rows, int a_div,
                                   int64_t rows, const bf16_bits* W, bf16_bits* C, int K, int N,
                                   bool swiglu, const int32_t* dev_plan, int E, cudaStream_t s);

}  // namespace sinkscope::cuda::k
