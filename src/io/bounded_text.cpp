#include "io/bounded_text.hpp"

namespace sinkscope {

bool parse_decimal(std::string_view text, uint64_t max, uint64_t* value) {
  if (text.empty()) return false;
  uint64_t result = 0;
  for (const char c : text) {
    if (c < '0' || c > '9') return false;
    // Overflow-checked result * 10 + digit; a value past `max` stops the loop at once, so even
    // thousands of digits cost one pass.
    if (__builtin_mul_overflow(result, uint64_t{10}, &result) ||
        __builtin_add_overflow(result, static_cast<uint64_t>(c - '0'), &result) || result > max)
      return false;
  }
  *value = result;
  return true;
}

std::string excerpt(std::string_view text, size_t max_chars) {
  if (text.size() <= max_chars) return std::string(text);
  return std::string(text.substr(0, max_chars)) + "... (" + std::to_string(text.size()) +
         " characters)";
}

}  // namespace sinkscope
