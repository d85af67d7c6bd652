#include "cuda/check.hpp"

#include "sinkscope/error.hpp"

namespace sinkscope::cuda {
namespace {

// Per thread: tests run several ranks as threads of one process.
std::string& context() {
  thread_local std::string c;
  return c;
}

}  // namespace

void set_error_context(std::string c) { context() = std::move(c); }
std::string error_context() { return context(); }

void throw_api_failure(const char* api, const std::string& status, const char* call,
                       const char* file, int line) {
  int device = -1;
  std::string device_name = "?";
  if (cudaGetDevice(&device) == cudaSuccess) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, device) == cudaSuccess) device_name = prop.name;
  }
  std::string where = context().empty() ? std::string() : ", " + context();
  throw RuntimeFailure(std::string(api) + " error " + status + " in `" + call + "` at " + file +
                       ":" + std::to_string(line) + " on device " + std::to_string(device) + " (" +
                       device_name + ")" + where);
}

}  // namespace sinkscope::cuda
