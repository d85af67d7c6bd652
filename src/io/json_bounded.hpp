// JSON from untrusted files (the safetensors header, the sharded index, config.json) with its
// nesting bounded: nlohmann's parser builds one value per container, so 100 MB of '[' would
// become 100 million nested arrays (7 GB). The parse stops at the first container nested deeper
// than max_depth instead. Internal to src/ (nlohmann types).
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace sinkscope {

// Parses `text`. Throws InputError "<name>: not valid JSON (...)" or "<name>: JSON nested more
// than <max_depth> levels deep". `watch`, when given, sees every parse event as
// nlohmann::json::parse's callback would (duplicate-key checks) and may discard values.
nlohmann::json parse_json_bounded(std::string_view text, const std::string& name, int max_depth,
                                  const nlohmann::json::parser_callback_t& watch = nullptr);

}  // namespace sinkscope
