// CUDA registration of conv_bn_relu_infer: device guard, current stream, the shared host launcher.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/conv_bn_relu_host.h"

namespace rk {
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

}  // namespace
}  // namespace rk

TORCH_LIBRARY_IMPL(resnext_kernels, CUDA, m) {
  m.impl("conv_bn_relu_infer", &rk::conv_bn_relu_infer_cuda);
}
