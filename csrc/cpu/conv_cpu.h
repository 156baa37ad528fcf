// Entry points of the CPU convolution kernels shared between the CPU operators.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

#include "common/conv_geometry.h"
#include "cpu/conv_plan.h"

namespace rk {
namespace cpu {

// relu?(conv2d(input, weight) * scale[c] + shift[c] + residual?) as a channels_last tensor, for arguments
// already validated into `g` (float32/bfloat16 take float scale/shift, float64 takes double; both undefined: the
// bare convolution, scale 1 and shift 0), by the path plan_cpu_conv picks.
// With row_stats, the epilogue also fills *row_stats = [N*OH][3][C_out] (accumulation dtype): per output row and
// channel, the row's first value (pivot), the sum of the row's deviations from it, and their sum of squares.
at::Tensor conv_affine_nhwc_cpu(const ConvGeom& g, const at::Tensor& input, const at::Tensor& weight,
                                const at::Tensor& scale, const at::Tensor& shift,
                                const std::optional<at::Tensor>& residual, bool relu,
                                at::Tensor* row_stats = nullptr);
// The same by a given plan (plan_cpu_conv(g, input's dtype, the form of residual and row_stats)).
at::Tensor conv_affine_nhwc_cpu(const ConvPlan& plan, const ConvGeom& g, const at::Tensor& input,
                                const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& shift,
                                const std::optional<at::Tensor>& residual, bool relu, at::Tensor* row_stats = nullptr);

// Gradient of the convolution's weight, dW = sum over pixels of grad_y x input patches, as a contiguous
// [C_out, C_in/groups, KH, KW] tensor of the input's dtype, split as `plan` says (GradPlan::wgrad). Deterministic
// for any number of threads.
at::Tensor conv_weight_grad_cpu(const ConvGeom& g, const WgradPlan& plan, const at::Tensor& input,
                                const at::Tensor& grad_y);

}  // namespace cpu
}  // namespace rk
