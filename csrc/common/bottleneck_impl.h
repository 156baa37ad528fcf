// bottleneck_infer, the whole aggregated bottleneck in inference form, written once for every device:
//
//   h1  = relu(conv1x1(input, w1) * s1 + b1)
//   h2  = relu(conv3x3(h1, w2; stride, dilation, groups) * s2 + b2)
//   sc  = input                                  (identity shortcut)
//       | conv1x1(input, w_down; stride) * s_down + b_down   (projection)
//   out = relu(conv1x1(h2, w3) * s3 + b3 + sc)
//
// A `Backend` supplies one operation, run for each of the four convolutions on validated arguments:
//
//   static at::Tensor conv_affine(const char* op, const ConvGeom& g, const at::Tensor& input,
//                                 const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& shift,
//                                 const at::Tensor* residual, bool relu);
//
// returning relu?(conv(input, weight) * scale + shift (+ residual)) as a channels_last tensor, with the
// BatchNorm affine, the residual add and the ReLU in the convolution's epilogue (the CPU kernels; on CUDA
// cuDNN's fused conv+bias(+add)+ReLU for the 1x1 convolutions and the project's kernel for the grouped one).
// Validation, the shapes between the steps and the output memory format live here, so the devices agree.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <vector>

#include "common/conv_checks.h"

namespace rk {

template <typename Backend>
at::Tensor bottleneck_infer_impl(const char* op, const at::Tensor& input, const at::Tensor& w1, const at::Tensor& s1,
                                 const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& s2,
                                 const at::Tensor& b2, const at::Tensor& w3, const at::Tensor& s3,
                                 const at::Tensor& b3, const std::optional<at::Tensor>& w_down,
                                 const std::optional<at::Tensor>& s_down, const std::optional<at::Tensor>& b_down,
                                 int64_t stride, int64_t groups, int64_t dilation) {
  const bool project = w_down.has_value() && w_down->defined();
  TORCH_CHECK(project == (s_down.has_value() && s_down->defined()) &&
                  project == (b_down.has_value() && b_down->defined()),
              op, ": w_down, s_down and b_down must be given together");
  TORCH_CHECK(w1.dim() == 4 && w1.size(2) == 1 && w1.size(3) == 1, op, ": w1 must be a 1x1 convolution weight");
  TORCH_CHECK(w3.dim() == 4 && w3.size(2) == 1 && w3.size(3) == 1, op, ": w3 must be a 1x1 convolution weight");
  TORCH_CHECK(!project || (w_down->dim() == 4 && w_down->size(2) == 1 && w_down->size(3) == 1), op,
              ": w_down must be a 1x1 convolution weight");
  const std::vector<int64_t> one{1, 1}, zero{0, 0}, s{stride, stride}, d{dilation, dilation};

  const ConvGeom g1 = check_conv_bn_relu_args(op, input, w1, s1, b1, one, zero, one, 1);
  const at::Tensor h1 = Backend::conv_affine(op, g1, input, w1, s1, b1, nullptr, true);
  const ConvGeom g2 = check_conv_bn_relu_args(op, h1, w2, s2, b2, s, d, d, groups);
  const at::Tensor h2 = Backend::conv_affine(op, g2, h1, w2, s2, b2, nullptr, true);
  const ConvGeom g3 = check_conv_bn_relu_args(op, h2, w3, s3, b3, one, zero, one, 1);
  at::Tensor shortcut;
  if (project) {
    const ConvGeom gd = check_conv_bn_relu_args(op, input, *w_down, *s_down, *b_down, s, zero, one, 1);
    shortcut = Backend::conv_affine(op, gd, input, *w_down, *s_down, *b_down, nullptr, false);
  } else {
    TORCH_CHECK(input.size(1) == g3.C_out && input.size(2) == g3.H && input.size(3) == g3.W, op,
                ": without a projection the input shape ", input.sizes(), " must equal the block output's [",
                g3.N, ", ", g3.C_out, ", ", g3.H, ", ", g3.W, "]");
    shortcut = input;
  }
  const at::Tensor out = Backend::conv_affine(op, g3, h2, w3, s3, b3, &shortcut, true);
  // Channels_last when the input or any weight is (what the chain of F.conv2d calls would give).
  bool channels_last = false;
  for (const at::Tensor& w : {w1, w2, w3, project ? *w_down : w1}) {
    channels_last |= conv_output_memory_format(input, w) == at::MemoryFormat::ChannelsLast;
  }
  return channels_last ? out : out.contiguous();
}

}  // namespace rk
