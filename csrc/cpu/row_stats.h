// Per-row statistics of a convolution's output, the training form's way to its batch statistics: per output row and
// channel, the row's first value (the pivot), the sum of the row's deviations from it and the sum of their squares
// ([N * OH][3][C_out]). The vector paths accumulate them in their epilogues (conv_problem.h), the generic path in its
// own; fill_row_stats computes them from a finished output (the oneDNN routes), merge_row_stats merges them.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "common/conv_geometry.h"

namespace rk {
namespace cpu {

// The row statistics of a finished channels_last output (float32, float64 or bfloat16) into row_stats (float).
void fill_row_stats(const ConvGeom& g, const at::Tensor& out, float* row_stats);

// Batch mean and biased variance per channel (M values each) of rows of `width` pixels, merged in row order.
void merge_row_stats(const at::Tensor& row_stats, int64_t width, int64_t M, std::vector<double>& mean,
                     std::vector<double>& var);

}  // namespace cpu
}  // namespace rk
