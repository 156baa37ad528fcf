// Every operator schema of the project, in one place. csrc/ops.cpp defines them in the
// `resnext_kernels` namespace; the emulated CUDA build (csrc/emu) defines the same schemas in
// `resnext_kernels_emu`, so tests call the CUDA host code with CPU tensors through an identical API.
#pragma once

// Grouped KxK convolution (no bias) followed by a per-output-channel affine map (BatchNorm in
// inference form, folded into scale/shift) and an optional ReLU:
//   out = relu?(conv2d(input, weight, stride, padding, dilation, groups) * scale[c] + shift[c])
// scale/shift have the accumulation dtype (float32 for fp16/bf16/fp32 inputs, float64 for fp64).
// The output memory format follows the input's (channels_last in, channels_last out).
#define RK_SCHEMA_CONV_BN_RELU_INFER                                                     \
  "conv_bn_relu_infer(Tensor input, Tensor weight, Tensor scale, Tensor shift, "         \
  "int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu) -> Tensor"
