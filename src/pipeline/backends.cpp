// The backend registry: the backends compiled into this build (the generated list) plus any a
// program registers itself (tests).
#include <algorithm>

#include "sinkscope/error.hpp"
#include "sinkscope/model.hpp"

namespace sinkscope {

#define SINKSCOPE_BACKEND(name) BackendEntry name##_backend_entry();
#include "sinkscope/backend_list.inc"
#undef SINKSCOPE_BACKEND

namespace {

std::vector<BackendEntry>& registry() {
  static std::vector<BackendEntry> entries = [] {
    std::vector<BackendEntry> v;
#define SINKSCOPE_BACKEND(name) v.push_back(name##_backend_entry());
#include "sinkscope/backend_list.inc"
#undef SINKSCOPE_BACKEND
    return v;
  }();
  return entries;
}

}  // namespace

void register_backend(BackendEntry entry) {
  auto& r = registry();
  auto it = std::find_if(r.begin(), r.end(), [&](const auto& e) { return e.name == entry.name; });
  if (it != r.end())
    *it = std::move(entry);
  else
    r.push_back(std::move(entry));
}

std::vector<std::string> backend_names() {
  std::vector<std::string> out;
  for (const auto& e : registry()) out.push_back(e.name);
  return out;
}

const BackendEntry& find_backend(const std::string& name) {
  for (const auto& e : registry())
    if (e.name == name) return e;
  std::string names;
  for (const auto& e : registry()) names += (names.empty() ? "" : ", ") + e.name;
  std::string hint;
  if (name == "cuda")
    hint = " (this sinkscope was built without CUDA: configure with -DSINKSCOPE_CUDA=ON)";
  throw InputError("--device " + name + ": not a backend of this build (built in: " + names + ")" +
                   hint);
}

}  // namespace sinkscope
