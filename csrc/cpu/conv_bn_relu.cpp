// CPU kernel of conv_bn_relu_infer, and conv_affine_nhwc_cpu, the fused convolution every CPU op runs: grouped KxK
// convolution + per-channel affine (folded BatchNorm) + optional residual + optional ReLU, NHWC, one pass over the
// output. The planner (conv_plan.h) picks the path; this file runs it inside a profiler scope of the path's name:
//   * the oneDNN routes (conv_onednn.cpp): oneDNN's convolution, then the affine, residual and ReLU in one pass;
//   * winograd_f4x4 / winograd_f2x2 (conv_winograd.h), lanes (conv_lanes.h), broadcast and expand (conv_broadcast.h,
//     conv_expand.h over conv_microkernel.h): float32/bfloat16 vector kernels, one build per ISA (AVX-512, AVX2)
//     picked at run time (isa.h), accumulating in float;
//   * generic (conv_generic.cpp): the portable kernel, accumulating in double for float64.
// Every path packs the weight with the BN scale folded in and starts each accumulator at the BN shift, so the
// epilogue is the residual, the ReLU and the store; the training form's per-row statistics come from the same
// epilogue (row_stats.h). Work is split over output rows by at::parallel_for. All indexing is 64-bit.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>

#include "common/conv_checks.h"
#include "common/path_scope.h"
#include "cpu/conv_cpu.h"
#include "cpu/conv_kernels.h"
#include "cpu/conv_plan.h"
#include "cpu/row_stats.h"

namespace rk {
namespace cpu {

at::Tensor conv_affine_nhwc_cpu(const ConvPlan& plan, const ConvGeom& g, const at::Tensor& input,
                                const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& shift,
                                const std::optional<at::Tensor>& residual, bool relu, at::Tensor* row_stats) {
  TORCH_CHECK(input.device().is_cpu(), "resnext_kernels (CPU kernel): input must be a CPU tensor");
  const PathScope scope(path_scope(plan.path));
  const auto dtype = input.scalar_type();
  TORCH_INTERNAL_ASSERT(plan.dtype == dtype && (plan.form == ConvForm::kTraining) == (row_stats != nullptr) &&
                        (plan.form == ConvForm::kResidual) == residual.has_value());
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == at::IntArrayRef({g.N, g.C_out, g.OH, g.OW}) && residual->scalar_type() == dtype,
                "resnext_kernels (CPU kernel): residual must have the output's shape [", g.N, ", ", g.C_out, ", ",
                g.OH, ", ", g.OW, "] and dtype ", dtype, ", got ", residual->sizes(), " ", residual->scalar_type());
  }
  if (is_onednn(plan.path)) {
    const at::Tensor res = residual.has_value() ? residual->contiguous(at::MemoryFormat::ChannelsLast) : at::Tensor();
    at::Tensor out = conv_on_aten(g, input.contiguous(at::MemoryFormat::ChannelsLast), weight, scale, shift,
                                  res.defined() ? &res : nullptr, relu);
    if (row_stats) {
      *row_stats = at::empty({g.N * g.OH, 3, g.C_out}, input.options().dtype(at::kFloat));
      fill_row_stats(g, out, row_stats->data_ptr<float>());
    }
    return out;
  }
  at::Tensor out = at::empty({g.N, g.C_out, g.OH, g.OW}, input.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor res = residual.has_value() ? residual->contiguous(at::MemoryFormat::ChannelsLast) : at::Tensor();
  const at::TensorOptions acc_options = input.options().dtype(dtype == at::kDouble ? at::kDouble : at::kFloat);
  if (row_stats) *row_stats = at::empty({g.N * g.OH, 3, g.C_out}, acc_options);
  const at::Tensor sc = scale.defined() ? scale : at::ones({g.C_out}, acc_options);
  const at::Tensor sh = shift.defined() ? shift : at::zeros({g.C_out}, acc_options);
  const ConvCall call{plan, x, weight, sc, sh, res.defined() ? &res : nullptr, out, relu,
                      row_stats ? row_stats->data_ptr() : nullptr};
  switch (plan.path) {
    case ConvPath::kWinogradF4x4:
    case ConvPath::kWinogradF2x2: run_winograd(call); break;
    case ConvPath::kLanes: run_lanes(call); break;
    case ConvPath::kBroadcast:
    case ConvPath::kExpand: run_broadcast_expand(call); break;
    case ConvPath::kGeneric: run_generic(call); break;
    default: TORCH_INTERNAL_ASSERT(false, "resnext_kernels (CPU kernel): unexpected path ", path_name(plan.path));
  }
  return out;
}

at::Tensor conv_affine_nhwc_cpu(const ConvGeom& g, const at::Tensor& input, const at::Tensor& weight,
                                const at::Tensor& scale, const at::Tensor& shift,
                                const std::optional<at::Tensor>& residual, bool relu, at::Tensor* row_stats) {
  const ConvForm form = row_stats ? ConvForm::kTraining : residual.has_value() ? ConvForm::kResidual
                                                                               : ConvForm::kInference;
  return conv_affine_nhwc_cpu(plan_cpu_conv(g, input.scalar_type(), form), g, input, weight, scale, shift, residual,
                              relu, row_stats);
}

namespace {

at::Tensor conv_bn_relu_infer_cpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& scale,
                                  const at::Tensor& shift, at::IntArrayRef stride, at::IntArrayRef padding,
                                  at::IntArrayRef dilation, int64_t groups, bool relu) {
  const ConvGeom g = check_conv_bn_relu_args("resnext_kernels::conv_bn_relu_infer", input, weight, scale, shift,
                                             stride, padding, dilation, groups);
  const at::Tensor out = conv_affine_nhwc_cpu(g, input, weight, scale, shift, std::nullopt, relu);
  return out.contiguous(conv_output_memory_format(input, weight));
}

}  // namespace
}  // namespace cpu
}  // namespace rk

TORCH_LIBRARY_IMPL(resnext_kernels, CPU, m) {
  m.impl("conv_bn_relu_infer", &rk::cpu::conv_bn_relu_infer_cpu);
}
