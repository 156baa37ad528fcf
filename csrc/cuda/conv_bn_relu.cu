// CUDA registrations of the fused ops: device guard, current stream, the shared host launchers.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/bn_train_host.h"
#include "cuda/conv_affine_cuda.h"
#include "cuda/conv_bn_relu_host.h"

namespace rk {

const char* conv_bn_relu_cuda_unsupported(const ConvGeom& g, at::ScalarType dtype) {
  return conv_bn_relu_cuda_unsupported_reason(g, dtype);
}

at::Tensor conv_affine_nhwc_cuda_current_stream(const char* op, const ConvGeom& g, const at::Tensor& input,
                                                const at::Tensor& weight, const at::Tensor& scale,
                                                const at::Tensor& shift, bool relu) {
  at::Tensor out = conv_affine_nhwc_cuda(op, g, input, weight, scale, shift, relu, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

namespace {

at::Tensor conv_bn_relu_infer_cuda(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& scale,
                                   const at::Tensor& shift, at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, int64_t groups, bool relu) {
  TORCH_CHECK(input.is_cuda(), "resnext_kernels::conv_bn_relu_infer (CUDA kernel): input must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = conv_bn_relu_infer_cuda_host(input, weight, scale, shift, stride, padding, dilation, groups, relu,
                                                c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_train_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, double eps, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu) {
  TORCH_CHECK(input.is_cuda(), "resnext_kernels::conv_bn_relu_train (CUDA kernel): input must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(input.device());
  auto out = conv_bn_relu_train_cuda_host(input, weight, bn_weight, bn_bias, eps, stride, padding, dilation, groups,
                                          relu, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_train_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& conv_out,
    const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, double eps, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu, std::array<bool, 3> output_mask) {
  TORCH_CHECK(input.is_cuda(), "resnext_kernels::conv_bn_relu_train_backward (CUDA kernel): input must be on CUDA");
  const c10::cuda::CUDAGuard guard(input.device());
  auto out = conv_bn_relu_train_backward_cuda_host(grad_out, input, weight, conv_out, mean, var, bn_weight, bn_bias, eps,
                                                   stride, padding, dilation, groups, relu, output_mask,
                                                   c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace rk

TORCH_LIBRARY_IMPL(resnext_kernels, CUDA, m) {
  m.impl("conv_bn_relu_infer", &rk::conv_bn_relu_infer_cuda);
  m.impl("conv_bn_relu_train", &rk::conv_bn_relu_train_cuda);
  m.impl("conv_bn_relu_train_backward", &rk::conv_bn_relu_train_backward_cuda);
}
