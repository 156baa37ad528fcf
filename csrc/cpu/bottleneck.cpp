// CPU kernel of bottleneck_infer: the whole aggregated bottleneck in one operator call
// (common/bottleneck_impl.h). Each convolution goes through conv_affine_nhwc_cpu with its BatchNorm folded, on the
// path the planner picks for it (conv_plan.h; the last 1x1 convolution in the residual form). The shortcut (identity
// or projection) is added, and the final ReLU applied, in the last 1x1 convolution's epilogue (or in the pass after
// oneDNN's convolution). Intermediates stay channels_last.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "common/bottleneck_impl.h"
#include "cpu/conv_cpu.h"

namespace rk {
namespace cpu {
namespace {

struct CpuBackend {
  static at::Tensor conv_affine(const char* /*op*/, const ConvGeom& g, const at::Tensor& input,
                                const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& shift,
                                const at::Tensor* residual, bool relu) {
    return conv_affine_nhwc_cpu(g, input, weight, scale, shift,
                                residual ? std::optional<at::Tensor>(*residual) : std::nullopt, relu);
  }
};

at::Tensor bottleneck_infer_cpu(const at::Tensor& input, const at::Tensor& w1, const at::Tensor& s1,
                                const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& s2,
                                const at::Tensor& b2, const at::Tensor& w3, const at::Tensor& s3,
                                const at::Tensor& b3, const std::optional<at::Tensor>& w_down,
                                const std::optional<at::Tensor>& s_down, const std::optional<at::Tensor>& b_down,
                                int64_t stride, int64_t groups, int64_t dilation) {
  return bottleneck_infer_impl<CpuBackend>("resnext_kernels::bottleneck_infer", input, w1, s1, b1, w2, s2, b2, w3,
                                           s3, b3, w_down, s_down, b_down, stride, groups, dilation);
}

}  // namespace
}  // namespace cpu
}  // namespace rk

TORCH_LIBRARY_IMPL(resnext_kernels, CPU, m) {
  m.impl("bottleneck_infer", &rk::cpu::bottleneck_infer_cpu);
}
