// CUDA registrations of the fused ops: device guard, current stream, the shared host launchers.
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/backend_select.h"
#include "cuda/bn_train_host.h"
#include "cuda/conv_affine_cuda.h"
#include "cuda/conv_bn_relu_host.h"
#include "schemas.h"

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

// Times a candidate on the current stream with CUDA events (the choice warms up and repeats).
struct CudaEventTimer {
  cudaStream_t stream;
  template <typename Ours, typename Library>
  BackendChooser::Timer operator()(Ours& ours, Library& library) const {
    return [&ours, &library, s = stream](CudaBackend backend) {
      cudaEvent_t start, stop;
      C10_CUDA_CHECK(cudaEventCreate(&start));
      C10_CUDA_CHECK(cudaEventCreate(&stop));
      C10_CUDA_CHECK(cudaEventRecord(start, s));
      if (backend == CudaBackend::kOurs) {
        ours();
      } else {
        library();
      }
      C10_CUDA_CHECK(cudaEventRecord(stop, s));
      C10_CUDA_CHECK(cudaEventSynchronize(stop));
      float ms = 0.f;
      C10_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
      C10_CUDA_CHECK(cudaEventDestroy(start));
      C10_CUDA_CHECK(cudaEventDestroy(stop));
      return double(ms);
    };
  }
};

// Nothing is timed while a CUDA graph is being captured.
bool can_time() { return c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None; }

at::Tensor conv_bn_relu_infer_cuda(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& scale,
                                   const at::Tensor& shift, at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, int64_t groups, bool relu) {
  TORCH_CHECK(input.is_cuda(), "resnext_kernels::conv_bn_relu_infer (CUDA kernel): input must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor out = select_infer(input, weight, scale, shift, stride, padding, dilation, groups, relu, stream,
                                can_time(), CudaEventTimer{stream});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_train_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, double eps, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu) {
  TORCH_CHECK(input.is_cuda(), "resnext_kernels::conv_bn_relu_train (CUDA kernel): input must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto out = select_train(input, weight, bn_weight, bn_bias, eps, stride, padding, dilation, groups, relu, stream,
                          can_time(), CudaEventTimer{stream});
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
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto out = select_train_backward(grad_out, input, weight, conv_out, mean, var, bn_weight, bn_bias, eps, stride,
                                   padding, dilation, groups, relu, output_mask, stream, can_time(),
                                   CudaEventTimer{stream});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace rk

// The run-time choice's view for explain(): in CUDA builds only.
TORCH_LIBRARY_FRAGMENT(resnext_kernels, m) { m.def(RK_SCHEMA_CUDA_BACKEND, &rk::backend_lookup); }

TORCH_LIBRARY_IMPL(resnext_kernels, CUDA, m) {
  m.impl("conv_bn_relu_infer", &rk::conv_bn_relu_infer_cuda);
  m.impl("conv_bn_relu_train", &rk::conv_bn_relu_train_cuda);
  m.impl("conv_bn_relu_train_backward", &rk::conv_bn_relu_train_backward_cuda);
}
