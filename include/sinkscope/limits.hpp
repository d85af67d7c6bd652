// Limits on untrusted input (docs/reliability.md "Limits"). Every size that comes from a file or
// an option is checked against one of these, with overflow-safe arithmetic, before anything is
// allocated or read from it; going past one is bad input (exit status 1, one line naming it).
#pragma once

#include <cstdint>

namespace sinkscope {

// safetensors header length: the reference implementation's bound.
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = uint64_t{100} << 20;  // 100 MiB
// JSON nesting of the safetensors header, the index and config.json (valid files nest at most 3
// levels). The parse stops at the first deeper container, so memory stays small whatever the size.
inline constexpr int kMaxJsonDepth = 64;
inline constexpr uint64_t kMaxConfigBytes = uint64_t{1} << 20;      // config.json: 1 MiB
inline constexpr uint64_t kMaxIndexBytes = uint64_t{64} << 20;      // model.safetensors.index.json
inline constexpr uint64_t kMaxNpyHeaderBytes = uint64_t{64} << 10;  // the dict of a .npy file

// config.json counts (far above any released model, low enough that nothing sized by them can
// exhaust memory before the tensors are checked).
inline constexpr int64_t kMaxLayers = 4096, kMaxHeads = 16384, kMaxExperts = 65536,
                         kMaxHidden = int64_t{1} << 20, kMaxVocab = int64_t{1} << 24,
                         kMaxInter = int64_t{1} << 22, kMaxHeadDim = 4096;

// Probe tokens, N x T (after --prepend-bos too): 2^28 tokens, 1 GiB as int32.
inline constexpr uint64_t kMaxTokens = uint64_t{1} << 28;

// Options.
inline constexpr int kMaxThreads = 1024;                // --threads
inline constexpr int64_t kMaxBatch = int64_t{1} << 20;  // --batch (probes per micro-batch)
inline constexpr int64_t kMaxRankTimeoutSeconds = 7 * 24 * 3600;  // --rank-timeout
inline constexpr int64_t kDefaultRankTimeoutSeconds = 600;

// Reading an analysis file in a child process (sweep --resume, assembling): HDF5 can loop or
// allocate without end on a damaged file. The child is killed after this many seconds plus one
// per MiB of the file, and may allocate at most 1 GiB plus 16 times the file's size.
inline constexpr int kIsolatedReadSeconds = 120;

}  // namespace sinkscope
