// Every operator schema of the project, in one place. csrc/ops.cpp defines them in the
// `resnext_kernels` namespace; the emulated CUDA build (csrc/emu) defines the same schemas in
// `resnext_kernels_emu`, so tests call the CUDA host code with CPU tensors through an identical API.
#pragma once

// Grouped KxK convolution (no bias) followed by a per-output-channel affine map (BatchNorm in
// inference form, folded into scale/shift) and an optional ReLU:
//   out = relu?(conv2d(input, weight, stride, padding, dilation, groups) * scale[c] + shift[c])
// scale/shift have the accumulation dtype (float32 for fp16/bf16/fp32 inputs, float64 for fp64).
// The output is channels_last when the input or the weight suggests channels_last (F.conv2d's rule).
#define RK_SCHEMA_CONV_BN_RELU_INFER                                                     \
  "conv_bn_relu_infer(Tensor input, Tensor weight, Tensor scale, Tensor shift, "         \
  "int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu) -> Tensor"

// Training form: BatchNorm with the batch statistics of the conv output y = conv2d(input, weight):
//   out = relu?((y - mean) / sqrt(var + eps) * bn_weight + bn_bias)
// Returns out (memory format by F.conv2d's rule), y (channels_last, input dtype: saved for backward), and the
// per-channel batch mean and biased variance (accumulation dtype). Functional: running statistics are
// updated by the caller (resnext_kernels.ops) from mean and var.
#define RK_SCHEMA_CONV_BN_RELU_TRAIN                                                              \
  "conv_bn_relu_train(Tensor input, Tensor weight, Tensor? bn_weight, Tensor? bn_bias, float eps, " \
  "int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu) "                        \
  "-> (Tensor out, Tensor conv_out, Tensor mean, Tensor var)"

// Backward of conv_bn_relu_train. output_mask selects (grad_input, grad_weight, grad of bn_weight and
// bn_bias); a gradient not asked for comes back as an empty tensor.
#define RK_SCHEMA_CONV_BN_RELU_TRAIN_BACKWARD                                                            \
  "conv_bn_relu_train_backward(Tensor grad_out, Tensor input, Tensor weight, Tensor conv_out, "          \
  "Tensor mean, Tensor var, Tensor? bn_weight, Tensor? bn_bias, float eps, int[2] stride, "              \
  "int[2] padding, int[2] dilation, int groups, bool relu, bool[3] output_mask) "                        \
  "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bn_weight, Tensor grad_bn_bias)"

// The aggregated bottleneck (torchvision's Bottleneck / ResNeXt block) in inference form, one call per
// block: every BatchNorm folded into per-channel scale/shift (accumulation dtype),
//   h1  = relu(conv1x1(input, w1) * s1 + b1)
//   h2  = relu(conv3x3(h1, w2, stride, padding=dilation, dilation, groups) * s2 + b2)
//   id  = input, or conv1x1(input, w_down, stride) * s_down + b_down when w_down is given
//   out = relu(conv1x1(h2, w3) * s3 + b3 + id)
// The output is channels_last when the input or any weight is.
#define RK_SCHEMA_BOTTLENECK_INFER                                                                       \
  "bottleneck_infer(Tensor input, Tensor w1, Tensor s1, Tensor b1, Tensor w2, Tensor s2, Tensor b2, "    \
  "Tensor w3, Tensor s3, Tensor b3, Tensor? w_down, Tensor? s_down, Tensor? b_down, int stride, "       \
  "int groups, int dilation) -> Tensor"

// Private ops of the resnext_kernels namespace only (no tensors, no device): what the CPU reports about itself, and
// the planners of the CPU and CUDA convolution paths, which explain() and the tests read. Sizes of -1 in
// _plan_cuda_conv are unknown (torch.compile traces with symbolic sizes).
#define RK_SCHEMA_CPU_CONFIG \
  "_cpu_config() -> (str isa, str supported_isa, str vendor, bool native_bf16, bool aten_routes)"
#define RK_SCHEMA_PLAN_CONV                                                                                       \
  "_plan_conv(int[] input_size, int[] weight_size, int[] stride, int[] padding, int[] dilation, int groups, "     \
  "ScalarType dtype, str form) -> (str path, str reason, str[] param_names, int[] param_values, str data_grad, "  \
  "str weight_grad, str grads_reason)"
#define RK_SCHEMA_PLAN_CUDA_CONV                                                                                  \
  "_plan_cuda_conv(int[] input_size, int[] weight_size, int[] stride, int[] padding, int[] dilation, "           \
  "int groups, ScalarType dtype, bool training) -> (str path, str reason, str[] param_names, int[] param_values, " \
  "str data_grad, str weight_grad, str grads_reason)"

// The run-time choice between the project's CUDA kernels and cuDNN for a problem (csrc/cuda/backend_choice.h):
// backend ("ours", "cudnn", or "" before the first call times it), both times in ms (-1: not timed), reason.
// form: 0 inference, 1 training forward, 2 training backward. In CUDA builds (and the emulated namespace) only.
#define RK_SCHEMA_CUDA_BACKEND                                                                                    \
  "_cuda_backend(int form, int device, int[] input_size, int[] weight_size, int[] stride, int[] padding, "       \
  "int[] dilation, int groups, ScalarType dtype, bool channels_last, bool relu) -> (str backend, float ours_ms, " \
  "float library_ms, str reason)"
