// MXFP4 (OCP Microscaling FP4), the form of gpt-oss's released expert weights: blocks of 32
// values share one e8m0 scale byte (2^(s - 127)); each value is an fp4 e2m1 nibble, two per byte,
// the low nibble holding the even element (transformers' integrations/mxfp4.py,
// convert_moe_packed_tensors).
#pragma once

#include <cstdint>

namespace sinkscope {

// The 16 e2m1 values: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0; 0b0001 is the
// subnormal 0.5.
float e2m1_value(uint8_t nibble);

// Decodes `rows` rows of `groups` blocks: blocks [rows, groups, 16] bytes, scales [rows, groups]
// bytes, out [rows, groups * 32] floats. Returns the index of the first scale byte of 255 (e8m0
// NaN) or rows * groups when there is none (out is then complete).
int64_t decode_mxfp4(const uint8_t* blocks, const uint8_t* scales, int64_t rows, int64_t groups,
                     float* out);

}  // namespace sinkscope
