// Bounded handling of untrusted text: numbers parsed without std::sto* (whose exceptions name
// nothing) and excerpts that keep an error message one short line whatever the input's length.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace sinkscope {

// A decimal number of digits only (no sign, no spaces) that is at most `max`. Returns false, and
// leaves *value alone, for an empty string, any other character, or a value above `max`.
bool parse_decimal(std::string_view text, uint64_t max, uint64_t* value);

// `text` when it has at most max_chars characters, otherwise its start followed by
// "... (N characters)": for echoing untrusted text (a tensor name, an option value) in a message.
std::string excerpt(std::string_view text, size_t max_chars = 40);

}  // namespace sinkscope
