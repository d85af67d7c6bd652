// Probe sequences: the token matrix [N, T] every rank agrees on.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "sinkscope/ndarray.hpp"

namespace sinkscope {

// --tokens FILE: .npy (int32/int64, [N, T], C order) or .h5 with dataset /tokens.
// Throws InputError naming the file (empty, ragged, wrong dtype or rank, not a regular file, more
// than kMaxTokens tokens, ...).
IntArray load_tokens(const std::string& path);

// --probes random:N:T:SEED | repeat:N:T:TOKEN. Throws InputError naming the option (numbers
// checked without overflow; N x T at most kMaxTokens, sinkscope/limits.hpp). Random ids
// are drawn uniformly from [0, vocab_size) without the ids in `excluded` (contract 1.2: the
// special tokens of special_token_ids and the --prepend-bos id).
IntArray make_probes(const std::string& spec, int64_t vocab_size,
                     const std::vector<int32_t>& excluded = {});

// The special token ids a model names: bos_token_id, eos_token_id and pad_token_id of
// MODEL_DIR/config.json and MODEL_DIR/generation_config.json (an id or a list of ids; null and
// absent keys ignored), sorted, without duplicates.
std::vector<int32_t> special_token_ids(const std::string& model_dir);

// Throws InputError "<source>: ..." when n x t overflows or exceeds kMaxTokens.
void check_token_count(uint64_t n, uint64_t t, const std::string& source);

// --prepend-bos ID: a column of ID in front (T grows by one). Throws InputError (one line) when a
// probe already starts with ID: the BOS would be doubled.
IntArray prepend_bos(const IntArray& tokens, int32_t bos);

// Every id must be < vocab_size and >= 0: otherwise InputError naming the first bad (row, column,
// id) and `source`.
void check_token_ids(const IntArray& tokens, int64_t vocab_size, const std::string& source);

// Hex SHA-256 of the int32 token bytes (the `tokens_sha256` attribute).
std::string tokens_sha256(const IntArray& tokens);

// Writes a .npy int32 file (used by tests and tools).
void save_npy_int32(const std::string& path, const IntArray& tokens);

std::string sha256_hex(const void* data, size_t n);

}  // namespace sinkscope
