// Helpers shared by the unit tests: temporary folders and small synthetic checkpoints.
#pragma once

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <string>

#include "sinkscope/config.hpp"
#include "sinkscope/ndarray.hpp"

namespace sinkscope::test {

// A fresh folder under the system temp dir, removed when the object dies.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "sinkscope-test-XXXXXX").string();
    path_ = ::mkdtemp(tmpl.data());
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const {
    return (std::filesystem::path(path_) / name).string();
  }

 private:
  std::string path_;
};

inline void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// A small MoE shape with GQA, a dense layer and explicit head_dim.
inline ModelConfig tiny_config(int64_t layers = 3) {
  ModelConfig c;
  c.model_type = "qwen3_moe";
  c.vocab_size = 40;
  c.hidden_size = 32;
  c.num_layers = layers;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 8;
  c.intermediate_size = 48;
  c.moe_intermediate_size = 16;
  c.num_experts = 4;
  c.top_k = 2;
  c.mlp_only_layers = {layers - 1};
  return c;
}

// Probes [n, t] with ids in [lo, vocab) and `first` at position 0 when first >= 0.
inline IntArray probe_matrix(size_t n, size_t t, int32_t lo, int32_t vocab, int32_t first,
                             uint64_t seed) {
  IntArray p({n, t}, "probe,position");
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> dist(lo, vocab - 1);
  for (auto& v : p.data) v = dist(rng);
  if (first >= 0)
    for (size_t i = 0; i < n; ++i) p.data[i * t] = first;
  return p;
}

}  // namespace sinkscope::test
