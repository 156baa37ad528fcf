// CUDA registration of bottleneck_infer: the shared block (common/bottleneck_impl.h) over the CUDA backend
// (cuda/bottleneck_backend.h) with cuDNN's fused convolution epilogues for the dense 1x1 convolutions and the
// project's kernel for the grouped 3x3. Compiled by g++ (no kernel source here), so it may use ATen freely.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/cudnn_convolution_add_relu.h>
#include <ATen/ops/cudnn_convolution_relu.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/bottleneck_impl.h"
#include "cuda/bottleneck_backend.h"
#include "cuda/conv_affine_cuda.h"

namespace rk {
namespace {

struct CudnnOps {
  static const char* grouped_unsupported(const ConvGeom& g, at::ScalarType dtype) {
    return conv_bn_relu_cuda_unsupported(g, dtype);
  }

  static at::Tensor grouped(const char* op, const ConvGeom& g, const at::Tensor& x, const at::Tensor& w,
                            const at::Tensor& scale, const at::Tensor& shift, bool relu) {
    return conv_affine_nhwc_cuda_current_stream(op, g, x, w, scale, shift, relu);
  }

  static at::Tensor conv_bias(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const ConvGeom& g,
                              const at::Tensor* residual, bool relu) {
    const std::vector<int64_t> stride{g.stride_h, g.stride_w}, padding{g.pad_h, g.pad_w}, dilation{g.dil_h, g.dil_w};
    if (relu && at::globalContext().userEnabledCuDNN()) {  // cuDNN's fused conv + bias (+ add) + ReLU
      if (residual != nullptr) {
        return at::cudnn_convolution_add_relu(x, w, *residual, at::Scalar(1.0), bias, stride, padding, dilation,
                                              g.groups);
      }
      return at::cudnn_convolution_relu(x, w, bias, stride, padding, dilation, g.groups);
    }
    at::Tensor y = at::convolution(x, w, bias, stride, padding, dilation, false, {0, 0}, g.groups);
    if (residual != nullptr) y.add_(*residual);
    return relu ? y.relu_() : y;
  }
};

at::Tensor bottleneck_infer_cuda(const at::Tensor& input, const at::Tensor& w1, const at::Tensor& s1,
                                 const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& s2,
                                 const at::Tensor& b2, const at::Tensor& w3, const at::Tensor& s3,
                                 const at::Tensor& b3, const std::optional<at::Tensor>& w_down,
                                 const std::optional<at::Tensor>& s_down, const std::optional<at::Tensor>& b_down,
                                 int64_t stride, int64_t groups, int64_t dilation) {
  TORCH_CHECK(input.is_cuda(), "resnext_kernels::bottleneck_infer (CUDA): input must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(input.device());
  return bottleneck_infer_impl<CudaBlockBackend<CudnnOps>>("resnext_kernels::bottleneck_infer (CUDA)", input, w1, s1,
                                                           b1, w2, s2, b2, w3, s3, b3, w_down, s_down, b_down, stride,
                                                           groups, dilation);
}

}  // namespace
}  // namespace rk

TORCH_LIBRARY_IMPL(resnext_kernels, CUDA, m) {
  m.impl("bottleneck_infer", &rk::bottleneck_infer_cuda);
}
