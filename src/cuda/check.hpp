// One check-macro family for the CUDA runtime and cuBLAS, made from one generic
// macro: a failed call throws sinkscope::RuntimeFailure naming the call, file:line, the device and
// the rank/host context the backend set. Never used inside assert.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <string>

namespace sinkscope::cuda {

// "rank R on HOST": set once by the backend so every message names where it happened.
void set_error_context(std::string context);
// This thread's context (a helper thread copies its creator's).
std::string error_context();

[[noreturn]] void throw_api_failure(const char* api, const std::string& status, const char* call,
                                    const char* file, int line);

inline void check_status(cudaError_t status, const char* call, const char* file, int line) {
  if (status != cudaSuccess)
    throw_api_failure(
        "CUDA", std::string(cudaGetErrorName(status)) + " (" + cudaGetErrorString(status) + ")",
        call, file, line);
}

inline void check_status(cublasStatus_t status, const char* call, const char* file, int line) {
  if (status != CUBLAS_STATUS_SUCCESS)
    throw_api_failure(
        "cuBLAS",
        std::string(cublasGetStatusName(status)) + " (" + cublasGetStatusString(status) + ")", call,
        file, line);
}

}  // namespace sinkscope::cuda

#define SINKSCOPE_API_CHECK(call) ::sinkscope::cuda::check_status((call), #call, __FILE__, __LINE__)
#define CUDA_CHECK(call) SINKSCOPE_API_CHECK(call)
#define CUBLAS_CHECK(call) SINKSCOPE_API_CHECK(call)
// After a kernel launch: launch-configuration errors surface here, faults at the next sync.
#define CUDA_CHECK_LAUNCH(name) \
  ::sinkscope::cuda::check_status(cudaGetLastError(), name, __FILE__, __LINE__)
