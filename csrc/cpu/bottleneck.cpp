// CPU kernel of bottleneck_infer: the whole aggregated bottleneck in one operator call. Each convolution
// runs the fused conv kernel with its BatchNorm folded into the epilogue; the shortcut (identity or
// projection) is added, and the final ReLU applied, in the epilogue of the last 1x1 convolution, so the
// block makes no pass over memory besides its convolutions. Intermediates stay channels_last; the output is
// channels_last when the input or any weight is.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "common/conv_checks.h"
#include "cpu/conv_cpu.h"

namespace rk {
namespace cpu {
namespace {

at::Tensor bottleneck_infer_cpu(const at::Tensor& input, const at::Tensor& w1, const at::Tensor& s1,
                                const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& s2,
                                const at::Tensor& b2, const at::Tensor& w3, const at::Tensor& s3,
                                const at::Tensor& b3, const std::optional<at::Tensor>& w_down,
                                const std::optional<at::Tensor>& s_down, const std::optional<at::Tensor>& b_down,
                                int64_t stride, int64_t groups, int64_t dilation) {
  constexpr const char* op = "resnext_kernels::bottleneck_infer";
  const bool project = w_down.has_value() && w_down->defined();
  TORCH_CHECK(project == (s_down.has_value() && s_down->defined()) &&
                  project == (b_down.has_value() && b_down->defined()),
              op, ": w_down, s_down and b_down must be given together");
  TORCH_CHECK(w1.dim() == 4 && w1.size(2) == 1 && w1.size(3) == 1, op, ": w1 must be a 1x1 convolution weight");
  TORCH_CHECK(w3.dim() == 4 && w3.size(2) == 1 && w3.size(3) == 1, op, ": w3 must be a 1x1 convolution weight");
  const std::vector<int64_t> one{1, 1}, zero{0, 0}, s{stride, stride}, d{dilation, dilation};
  const ConvGeom g1 = check_conv_bn_relu_args(op, input, w1, s1, b1, one, zero, one, 1);
  const at::Tensor h1 = conv_affine_nhwc_cpu(g1, input, w1, s1, b1, std::nullopt, true);
  const ConvGeom g2 = check_conv_bn_relu_args(op, h1, w2, s2, b2, s, d, d, groups);
  const at::Tensor h2 = conv_affine_nhwc_cpu(g2, h1, w2, s2, b2, std::nullopt, true);
  const ConvGeom g3 = check_conv_bn_relu_args(op, h2, w3, s3, b3, one, zero, one, 1);
  at::Tensor shortcut;
  if (project) {
    TORCH_CHECK(w_down->dim() == 4 && w_down->size(2) == 1 && w_down->size(3) == 1, op,
                ": w_down must be a 1x1 convolution weight");
    const ConvGeom gd = check_conv_bn_relu_args(op, input, *w_down, *s_down, *b_down, s, zero, one, 1);
    shortcut = conv_affine_nhwc_cpu(gd, input, *w_down, *s_down, *b_down, std::nullopt, false);
  } else {
    TORCH_CHECK(input.size(1) == g3.C_out && input.size(2) == g3.H && input.size(3) == g3.W, op,
                ": without a projection the input shape ", input.sizes(), " must equal the block output's [",
                g3.N, ", ", g3.C_out, ", ", g3.H, ", ", g3.W, "]");
    shortcut = input;
  }
  const at::Tensor out = conv_affine_nhwc_cpu(g3, h2, w3, s3, b3, shortcut, true);
  // Channels_last when the input or any weight is (what the chain of F.conv2d calls would give).
  bool channels_last = false;
  for (const at::Tensor& w : {w1, w2, w3, project ? *w_down : w1}) {
    channels_last |= conv_output_memory_format(input, w) == at::MemoryFormat::ChannelsLast;
  }
  return channels_last ? out : out.contiguous();
}

}  // namespace
}  // namespace cpu
}  // namespace rk

TORCH_LIBRARY_IMPL(resnext_kernels, CPU, m) {
  m.impl("bottleneck_infer", &rk::cpu::bottleneck_infer_cpu);
}
