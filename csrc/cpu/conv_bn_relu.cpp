// CPU kernel of conv_bn_relu_infer: grouped KxK convolution + folded BatchNorm + optional ReLU in one
// pass over NHWC data.
//
// How it works
//   * The weight is packed once per call into wp[kh][kw][ci][co] (ci local to the group, co over all
//     output channels) in the accumulation type, with the BN scale folded in; the accumulator of an
//     output pixel starts at the BN shift, so the epilogue is only the optional ReLU and the store.
//   * Work items are output rows (n, oh), split across threads by at::parallel_for; a row is processed
//     in column tiles sized so that a thread's scratch stays cache-sized.
//   * Winograd path (conv_winograd.h): 3x3, stride 1, dilation 1, 8-64 channels per group in and out, no residual,
//     as F(2x2, 3x3) or F(4x4, 3x3) with 2.25x or 4x fewer multiply-adds; it takes precedence over the below.
//   * Channel-lane path (conv_lanes.h): groups of 2, 4 or 8 channels in and out with a 3-wide kernel put input
//     channels in the vector lanes and reorder the sums per output pixel; it takes precedence over the below.
//   * Dense 1x1 convolutions with >= kPointwiseWeightBytesForAten of weights, on AVX2 broadcast-path convolutions
//     with > kBroadcastBlockWeightBytesForAten of weights per channel block, and on Intel AVX-512 CPUs all
//     broadcast-path convolutions go to ATen (oneDNN), BN folded (conv_runs_on_aten).
//   * Otherwise vectorization runs across output channels (contiguous in NHWC and in wp), in one of two ways:
//       broadcast: when a group has >= kBroadcastMinWidth output channels (dense and wide groups), each
//                  input value is broadcast and multiplied into its group's slice of the accumulator;
//       expand:    when groups are narrow and the lane path does not apply (depthwise, 3 per group), the input
//                  columns of the tile are first expanded to e[ci][co] = x[group(co) * cpg_in + ci], so
//                  that the inner loop runs over all C_out channels with no per-group bookkeeping.
//   * Blocked path (float32/bfloat16 on AVX-512 or AVX2 machines, block widths a multiple of the vector
//     width): a microkernel keeps TP output pixels x NV vectors of output channels in registers over all
//     taps and input channels (GCC vector extensions; TP*NV is sized to the ISA's register file), so each
//     multiply-add costs at most one load. Expanded input rows are cached per thread and reused by the
//     next output rows (stride 1 reads each input row KH times).
//   * Generic path (float64, baseline CPUs, other widths): the same arithmetic with the accumulator in
//     memory, compiled for AVX-512 / AVX2 / baseline with GCC's target_clones.
//   * Optionally a residual tensor (same shape as the output) is added before the ReLU, which fuses a
//     bottleneck's "+ shortcut, ReLU" into its last convolution.
// Runtime ISA dispatch: __builtin_cpu_supports picks the AVX-512 (x86-64-v4) or AVX2 (x86-64-v3) build of
// the blocked path once per process. Accumulation is float for float32/bfloat16 and double for float64.
// All indexing is 64-bit.
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
