// Argument validation shared by every backend (CPU, CUDA, emulated CUDA) of the fused conv ops.
// The Python layer validates first with friendlier messages; these checks guard direct
// torch.ops.resnext_kernels.* callers so that no kernel ever sees inconsistent arguments.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "conv_geometry.h"

namespace rk {

inline bool is_acc_dtype_of(at::ScalarType acc, at::ScalarType in) {
  return in == at::kDouble ? acc == at::kDouble : acc == at::kFloat;
}

// The memory format of a convolution's output, by F.conv2d's rule: channels_last when the input or the
// weight suggests channels_last, else contiguous. (The input alone is not enough: with C == 1 it is both.)
inline at::MemoryFormat conv_output_memory_format(const at::Tensor& input, const at::Tensor& weight) {
  const auto cl = at::MemoryFormat::ChannelsLast;
  return input.suggest_memory_format() == cl || weight.suggest_memory_format() == cl ? cl
                                                                                     : at::MemoryFormat::Contiguous;
}

// The geometry of a convolution of an input of `in` = (N, C_in, H, W) sizes with a weight of `w` = (C_out,
// C_in / groups, KH, KW) sizes, checked.
inline ConvGeom make_conv_geometry(const char* op, at::IntArrayRef in, at::IntArrayRef w, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(in.size() == 4, op, ": input must be 4-D (N, C, H, W), got ", in.size(), "-D");
  TORCH_CHECK(w.size() == 4, op, ": weight must be 4-D (C_out, C_in/groups, KH, KW), got ", w.size(), "-D");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": stride, padding and dilation must have 2 elements");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1, op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, op, ": padding must be >= 0, got ", padding);
  TORCH_CHECK(dilation[0] >= 1 && dilation[1] >= 1, op, ": dilation must be >= 1, got ", dilation);
  TORCH_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);
  const int64_t C_in = in[1], C_out = w[0];
  TORCH_CHECK(C_in % groups == 0, op, ": input channels (", C_in, ") must be divisible by groups (", groups, ")");
  TORCH_CHECK(C_out % groups == 0, op, ": weight.size(0) (", C_out, ") must be divisible by groups (", groups, ")");
  TORCH_CHECK(w[1] * groups == C_in, op, ": weight.size(1) must be C_in/groups = ", C_in / groups, ", got ", w[1]);
  ConvGeom g{};
  g.N = in[0];
  g.C_in = C_in;
  g.H = in[2];
  g.W = in[3];
  g.C_out = C_out;
  g.KH = static_cast<int32_t>(w[2]);
  g.KW = static_cast<int32_t>(w[3]);
  g.stride_h = static_cast<int32_t>(stride[0]);
  g.stride_w = static_cast<int32_t>(stride[1]);
  g.pad_h = static_cast<int32_t>(padding[0]);
  g.pad_w = static_cast<int32_t>(padding[1]);
  g.dil_h = static_cast<int32_t>(dilation[0]);
  g.dil_w = static_cast<int32_t>(dilation[1]);
  g.groups = static_cast<int32_t>(groups);
  g.OH = conv_out_size(g.H, g.KH, g.stride_h, g.pad_h, g.dil_h);
  g.OW = conv_out_size(g.W, g.KW, g.stride_w, g.pad_w, g.dil_w);
  TORCH_CHECK(g.OH >= 1 && g.OW >= 1, op, ": the (padded) input ", g.H, "x", g.W,
              " is smaller than the dilated kernel ", g.KH, "x", g.KW);
  return g;
}

// Checks the convolution arguments shared by every fused op and returns the geometry.
inline ConvGeom check_conv_args(const char* op, const at::Tensor& input, const at::Tensor& weight,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups) {
  TORCH_CHECK(input.dim() == 4, op, ": input must be 4-D (N, C, H, W), got ", input.dim(), "-D");
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be 4-D (C_out, C_in/groups, KH, KW), got ",
              weight.dim(), "-D");
  TORCH_CHECK(input.is_floating_point(), op, ": input must be a floating-point tensor, got ",
              input.scalar_type());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
              " must match input dtype ", input.scalar_type());
  TORCH_CHECK(weight.device() == input.device(), op, ": input and weight must be on the same device");
  return make_conv_geometry(op, input.sizes(), weight.sizes(), stride, padding, dilation, groups);
}

// Checks a per-output-channel parameter vector (BN scale/shift/weight/bias/statistics).
inline void check_channel_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input,
                                 int64_t C_out) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C_out, op, ": ", name, " must be 1-D with C_out = ", C_out,
              " elements, got ", t.sizes());
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " must be on the input's device");
}

// Checks the arguments of conv_bn_relu_infer and returns the geometry of the convolution.
inline ConvGeom check_conv_bn_relu_args(const char* op, const at::Tensor& input, const at::Tensor& weight,
                                        const at::Tensor& scale, const at::Tensor& shift,
                                        at::IntArrayRef stride, at::IntArrayRef padding,
                                        at::IntArrayRef dilation, int64_t groups) {
  const ConvGeom g = check_conv_args(op, input, weight, stride, padding, dilation, groups);
  TORCH_CHECK(is_acc_dtype_of(scale.scalar_type(), input.scalar_type()) && scale.scalar_type() == shift.scalar_type(),
              op, ": scale and shift must be ", (input.scalar_type() == at::kDouble ? "float64" : "float32"),
              " for ", input.scalar_type(), " input, got ", scale.scalar_type(), " and ", shift.scalar_type());
  check_channel_vector(op, "scale", scale, input, g.C_out);
  check_channel_vector(op, "shift", shift, input, g.C_out);
  return g;
}

}  // namespace rk
