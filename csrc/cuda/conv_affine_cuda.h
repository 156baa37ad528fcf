// The fused grouped-conv kernel as plain functions of conv_bn_relu.cu, for host code compiled by g++
// (bottleneck_cuda.cpp) that must not include the kernel source.
#pragma once
#include <ATen/core/Tensor.h>

#include "common/conv_geometry.h"

namespace rk {

// Why the CUDA kernel does not cover this geometry and dtype, or nullptr.
const char* conv_bn_relu_cuda_unsupported(const ConvGeom& g, at::ScalarType dtype);

// relu?(conv2d(input, weight) * scale + shift), channels_last, on the current stream, for validated arguments.
at::Tensor conv_affine_nhwc_cuda_current_stream(const char* op, const ConvGeom& g, const at::Tensor& input,
                                                const at::Tensor& weight, const at::Tensor& scale,
                                                const at::Tensor& shift, bool relu);

}  // namespace rk
