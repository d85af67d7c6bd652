#include "io/json_bounded.hpp"

#include "io/bounded_text.hpp"
#include "sinkscope/error.hpp"

namespace sinkscope {

namespace {

// Thrown from the parser callback to stop the parse at once (returning false from the callback
// would only discard the value and keep reading, one level deeper each byte).
struct NestedTooDeep {};

}  // namespace

nlohmann::json parse_json_bounded(std::string_view text, const std::string& name, int max_depth,
                                  const nlohmann::json::parser_callback_t& watch) {
  using nlohmann::json;
  // `depth` is the number of containers around the event: 0 for the top-level value's start.
  const json::parser_callback_t bounded = [&](int depth, json::parse_event_t event, json& parsed) {
    if ((event == json::parse_event_t::object_start || event == json::parse_event_t::array_start) &&
        depth >= max_depth)
      throw NestedTooDeep{};
    return watch ? watch(depth, event, parsed) : true;
  };
  try {
    return json::parse(text.begin(), text.end(), bounded);
  } catch (const NestedTooDeep&) {
    throw InputError(name + ": JSON nested more than " + std::to_string(max_depth) +
                     " levels deep");
  } catch (const json::exception& e) {
    // nlohmann quotes the token it stopped at, which may be a string of any length.
    throw InputError(name + ": not valid JSON (" + excerpt(e.what(), 200) + ")");
  }
}

}  // namespace sinkscope
