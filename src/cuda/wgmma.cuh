// Hopper warpgroup matrix products (wgmma.mma_async, sm_90a) for the attention kernel: bf16
// operands, fp32 accumulators, M = 64 rows per warpgroup of 4 warps. Shared-memory operands are
// K-major tiles in the 128-byte swizzle (rows of 64 bf16; 16-byte chunk c of row r stored at chunk
// c ^ (r % 8); 8-row groups 1024 bytes apart; tile bases 1024-byte aligned), described by
// smem_desc(). Accumulator fragments: warp w of the warpgroup holds rows 16 w + lane / 4 (+ 8), at
// columns 8 j + 2 (lane % 4) (+ 1) in d[4 j .. 4 j + 3], as mma.sync's m16n8 D fragment repeated
// over j. Only compiled for sm_90a (the callers check __CUDA_ARCH_FEAT_SM90_ALL).
#pragma once

#include <cstdint>

namespace sinkscope::cuda::k::sm90 {

// A K-major 128-byte-swizzle operand at shared address `addr`: leading byte offset unused (1),
// stride byte offset 1024 (one 8-row group), swizzle mode 1 (128 B).
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (uint64_t{1} << 16) |
         (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}

// Byte offset of 16-byte chunk c (0..7) of row r in a 128-byte-swizzled [rows][64] bf16 block.
__device__ __forceinline__ uint32_t swizzle128(int r, int c) {
  return static_cast<uint32_t>(r * 128 + ((c ^ (r & 7)) << 4));
}

__device__ __forceinline__ void fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Generic-proxy writes to shared memory (cp.async, st.shared) made visible to wgmma's reads.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Keeps the compiler from moving accesses of an accumulator across wgmma's issue and wait.
template <int R>
__device__ __forceinline__ void pin(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// The accumulator operands d[0..R-1] of an inline asm, 8 at a time.
#define SINKSCOPE_WG_D8(i)                                                                    \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define SINKSCOPE_WG_D32 \
  SINKSCOPE_WG_D8(0), SINKSCOPE_WG_D8(8), SINKSCOPE_WG_D8(16), SINKSCOPE_WG_D8(24)
#define SINKSCOPE_WG_D64                                                           \
  SINKSCOPE_WG_D32, SINKSCOPE_WG_D8(32), SINKSCOPE_WG_D8(40), SINKSCOPE_WG_D8(48), \
      SINKSCOPE_WG_D8(56)
#define SINKSCOPE_WG_D128                                                                   \
  SINKSCOPE_WG_D64, SINKSCOPE_WG_D8(64), SINKSCOPE_WG_D8(72), SINKSCOPE_WG_D8(80),          \
      SINKSCOPE_WG_D8(88), SINKSCOPE_WG_D8(96), SINKSCOPE_WG_D8(104), SINKSCOPE_WG_D8(112), \
      SINKSCOPE_WG_D8(120)
// Their places in the instruction, and the places of the operands that follow them.
#define SINKSCOPE_WG_R32                                                                        \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define SINKSCOPE_WG_R64                                                                        \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "  \
  "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "  \
  "%56, %57, %58, %59, %60, %61, %62, %63}"
#define SINKSCOPE_WG_R128                                                                          \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "    \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "     \
  "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "     \
  "%56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, "     \
  "%74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, "     \
  "%92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, " \
  "%109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, "     \
  "%124, %125, %126, %127}"

// Wgmma<N>: m64nNk16 with R = N / 2 accumulators per thread.
//   ss: d (+)= A[64 x 16] B[N x 16]^T, A and B bf16 K-major in shared memory (descriptors a, b);
//       accumulate = 0 overwrites d.
//   rs: d += A[64 x 16] B[N x 16]^T, A bf16 in registers (the m16n8k16 A fragment of each warp's 16
//       rows), B as above.
// SINKSCOPE_WGMMA(N, R, first operand after d, ... as strings) defines one of them.
#define SINKSCOPE_WGMMA(N, R, P0, P1, P2, P3, P4)                                                  \
  template <>                                                                                      \
  struct Wgmma<N> {                                                                                \
    __device__ __forceinline__ static void ss(float (&d)[R], uint64_t a, uint64_t b,               \
                                              int accumulate) {                                    \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" P2                                         \
                   ", 0;\n"                                                                        \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32.bf16.bf16 " SINKSCOPE_WG_R##R   \
                   ", %" P0 ", %" P1 ", p, 1, 1, 0, 0;\n}\n"                                       \
                   : SINKSCOPE_WG_D##R                                                             \
                   : "l"(a), "l"(b), "r"(accumulate));                                             \
    }                                                                                              \
    __device__ __forceinline__ static void rs(float (&d)[R], const uint32_t (&a)[4], uint64_t b) { \
      asm volatile("wgmma.mma_async.sync.aligned.m64n" #N "k16.f32.bf16.bf16 " SINKSCOPE_WG_R##R   \
                   ", {%" P0 ", %" P1 ", %" P2 ", %" P3 "}, %" P4 ", 1, 1, 1, 0;\n"                \
                   : SINKSCOPE_WG_D##R                                                             \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));                          \
    }                                                                                              \
  };

template <int N>
struct Wgmma;
SINKSCOPE_WGMMA(64, 32, "32", "33", "34", "35", "36")
SINKSCOPE_WGMMA(128, 64, "64", "65", "66", "67", "68")
SINKSCOPE_WGMMA(256, 128, "128", "129", "130", "131", "132")

#undef SINKSCOPE_WGMMA
#undef SINKSCOPE_WG_R32
#undef SINKSCOPE_WG_R64
#undef SINKSCOPE_WG_R128
#undef SINKSCOPE_WG_D128
#undef SINKSCOPE_WG_D64
#undef SINKSCOPE_WG_D32
#undef SINKSCOPE_WG_D8

}  // namespace sinkscope::cuda::k::sm90
