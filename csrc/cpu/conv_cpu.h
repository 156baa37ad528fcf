// Entry points of the CPU convolution kernels shared between the CPU operators.
#pragma once
#include <ATen/core/Tensor.h>

#include "common/conv_geometry.h"

namespace rk {
namespace cpu {

// relu?(conv2d(input, weight) * scale[c] + shift[c] + residual?) as a channels_last tensor, for arguments
// already validated into `g` (float32/bfloat16 take float scale/shift, float64 takes double).
at::Tensor conv_affine_nhwc_cpu(const ConvGeom& g, const at::Tensor& input, const at::Tensor& weight,
                                const at::Tensor& scale, const at::Tensor& shift,
                                const std::optional<at::Tensor>& residual, bool relu);

}  // namespace cpu
}  // namespace rk
