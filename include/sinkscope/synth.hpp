// `sinkscope synth`: Hugging Face checkpoints of a given shape with random weights, optionally
// with a planted position-zero sink circuit whose components are known (docs/synth.md).
#pragma once

#include <cstdint>
#include <string>

#include "sinkscope/config.hpp"

namespace sinkscope {

struct PlantedCircuit {
  int64_t head_layer = 0, head = 0;       // the P0 head: writes a BOS feature at position 0
  int64_t expert_layer = 1, expert = 0;   // the amplifying expert: squares it into a big direction
  int64_t sink_layer = 2, sink_head = 0;  // the sink head: keys on that direction
  int32_t bos_token_id = 1;               // probes must start with it (--prepend-bos)
};

// The random weights' generator, recorded in model.safetensors' __metadata__
// ("sinkscope_synth_generator") and in planted_circuit.json ("generator"). A seed gives the same
// checkpoint for the same generator version: 1 (before 2026-12-01: one std::mt19937_64 stream with
// std::normal_distribution, in tensor order), 2 (a counter-based stream per tensor, docs/synth.md).
constexpr int kSynthGeneratorVersion = 2;

// Writes OUT/config.json and OUT/model.safetensors (bf16), and with `plant` also
// OUT/planted_circuit.json. Throws InputError when the shape cannot hold a planted circuit
// (fewer than 3 layers, layer 1 not MoE, hidden_size < 8, head_dim < 4). Draws and writes on
// `threads` OpenMP threads (0: OpenMP's default) in bounded memory (a few chunks of 4 Mi values
// per thread); the files are the same bytes whatever the thread count.
PlantedCircuit synthesize(const ModelConfig& cfg, const std::string& out_dir, bool plant,
                          uint64_t seed, int threads = 0);

}  // namespace sinkscope
