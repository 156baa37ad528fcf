// Entry points of the CPU convolution kernels shared between the CPU operators.
#pragma once
#include <ATen/core/Tensor.h>

#include "common/conv_geometry.h"

namespace rk {
namespace cpu {

// relu?(conv2d(input, weight) * scale[c] + shift[c] + residual?) as a channels_last tensor, for arguments
// already validated into `g` (float32/bfloat16 take float scale/shift, float64 takes double; both undefined: the
// bare convolution, scale 1 and shift 0).
// With row_stats, the epilogue also fills *row_stats = [N*OH][3][C_out] (accumulation dtype): per output row and
// channel, the row's first value (pivot), the sum of the row's deviations from it, and their sum of squares.
at::Tensor conv_affine_nhwc_cpu(const ConvGeom& g, const at::Tensor& input, const at::Tensor& weight,
                                const at::Tensor& scale, const at::Tensor& shift,
                                const std::optional<at::Tensor>& residual, bool relu,
                                at::Tensor* row_stats = nullptr);

// Gradient of the convolution's weight, dW = sum over pixels of grad_y x input patches, as a contiguous
// [C_out, C_in/groups, KH, KW] tensor of the input's dtype. Deterministic for any number of threads.
at::Tensor conv_weight_grad_cpu(const ConvGeom& g, const at::Tensor& input, const at::Tensor& grad_y);

// Whether the backward uses conv_weight_grad_cpu rather than ATen (oneDNN): always under
// torch.use_deterministic_algorithms(True), and where it measured at least as fast on x86-64 (AVX2/AVX-512,
// float32/bfloat16, 3x3 kernels, groups of 2-8 channels in and out: ResNeXt-50 32x4d stages 1-2). Mirrored by
// resnext_kernels.ops.explain.
bool weight_grad_kernel_preferred(const ConvGeom& g, at::ScalarType dtype);

// Whether conv_affine_nhwc_cpu runs its channel-lane path for this problem on this machine (float32/bfloat16,
// AVX2/AVX-512, 3-wide kernel, groups of 2, 4 or 8 channels in and out, and the Winograd path does not apply).
bool conv_uses_channel_lanes(const ConvGeom& g, at::ScalarType dtype);

// The output tile of the Winograd path conv_affine_nhwc_cpu runs for this problem on this machine: 2 (F(2x2, 3x3)),
// 4 (F(4x4, 3x3)), or 0 where the path does not apply (conv_winograd.h, winograd_plan).
int conv_winograd_tile(const ConvGeom& g, at::ScalarType dtype);

// Data gradient of a stride-1 convolution, dX = conv2d(grad_y, W flipped and transposed within each group), through
// conv_affine_nhwc_cpu: a channels_last tensor of grad_y's dtype. Deterministic like the forward.
at::Tensor conv_data_grad_cpu(const ConvGeom& g, const at::Tensor& grad_y, const at::Tensor& weight);

// Whether the backward uses conv_data_grad_cpu rather than ATen: stride 1 where the channel-lane path runs and
// measured faster than oneDNN (groups of 2-4 channels: ResNeXt-50 32x4d stage 1), or where the transposed problem
// runs the F(4x4, 3x3) Winograd path (ResNeXt-50 stages 2-4 on AVX2). Mirrored by resnext_kernels.ops.explain.
bool data_grad_kernel_preferred(const ConvGeom& g, at::ScalarType dtype);

}  // namespace cpu
}  // namespace rk
