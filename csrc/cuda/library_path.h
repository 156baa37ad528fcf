// The library path of the fused op on CUDA: cuDNN's convolution, then ATen's (cuDNN's) BatchNorm, then ReLU, as an
// eager nn.Sequential(Conv2d, BatchNorm2d, ReLU) runs it. The run-time choice (backend_choice.h) times it against
// the project's kernels; it returns what the fused ops return, so either can serve a call. ATen only: the real
// CUDA build and the emulated one (ATen on the CPU standing in for cuDNN) share it.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/batch_norm.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/native_batch_norm.h>
#include <ATen/ops/native_batch_norm_backward.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <array>
#include <optional>
#include <tuple>

#include "common/conv_checks.h"

namespace rk {
namespace library_detail {

inline at::Tensor conv(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups) {
  return at::convolution(x, w, std::nullopt, stride, padding, dilation, false, {0, 0}, groups);
}

inline at::Tensor opt(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

}  // namespace library_detail

// relu?(conv * scale + shift): BatchNorm in inference form with (mean 0, var 1, eps 0) is exactly that affine map.
inline at::Tensor library_infer(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& scale,
                                const at::Tensor& shift, at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, int64_t groups, bool relu) {
  const at::Tensor y = library_detail::conv(input, weight, stride, padding, dilation, groups);
  const auto acc = scale.options();
  at::Tensor out = at::batch_norm(y, scale, shift, at::zeros({scale.size(0)}, acc), at::ones({scale.size(0)}, acc),
                                  false, 0.0, 0.0, true);
  return relu ? out.relu_() : out;
}

// (out, conv_out (channels_last), batch mean, biased batch variance), as conv_bn_relu_train returns them.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> library_train(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, double eps, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu) {
  const at::ScalarType acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor y = library_detail::conv(input, weight, stride, padding, dilation, groups)
                           .contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor gamma = bn_weight.has_value() ? bn_weight->to(acc) : at::Tensor();
  const at::Tensor beta = bn_bias.has_value() ? bn_bias->to(acc) : at::Tensor();
  auto [out, mean, invstd] = at::native_batch_norm(y, gamma, beta, at::Tensor(), at::Tensor(), true, 0.0, eps);
  at::Tensor var = invstd.pow(-2).sub_(eps);  // the biased variance the BatchNorm normalized with
  if (relu) out.relu_();
  return {out.contiguous(conv_output_memory_format(input, weight)), y, mean.to(acc), var.to(acc)};
}

// (grad_input, grad_weight, grad_bn_weight, grad_bn_bias) from conv_bn_relu_train's saved tensors: the ReLU mask
// recomputed from conv_out and the statistics, ATen's BatchNorm backward, cuDNN's convolution backward.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> library_train_backward(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& conv_out,
    const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, double eps, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu, std::array<bool, 3> output_mask) {
  const at::ScalarType acc = mean.scalar_type();
  const at::Tensor gamma = bn_weight.has_value() ? bn_weight->to(acc) : at::Tensor();
  const at::Tensor beta = bn_bias.has_value() ? bn_bias->to(acc) : at::Tensor();
  const at::Tensor invstd = var.add(eps).rsqrt();
  const auto view = [](const at::Tensor& t) { return t.view({1, -1, 1, 1}); };
  at::Tensor g = grad_out.to(conv_out.scalar_type()).contiguous(at::MemoryFormat::ChannelsLast);
  if (relu) {
    const at::Tensor a = gamma.defined() ? gamma.mul(invstd) : invstd;
    const at::Tensor b = (beta.defined() ? beta : at::zeros_like(mean)).sub(mean.mul(a));
    g = g.masked_fill(conv_out.to(acc).mul(view(a)).add_(view(b)).gt(0).logical_not(), 0);  // the forward's ReLU
  }
  auto [grad_y, grad_gamma, grad_beta] = at::native_batch_norm_backward(
      g, conv_out, gamma, at::Tensor(), at::Tensor(), mean, invstd, true, eps,
      {true, output_mask[2] && gamma.defined(), output_mask[2]});
  at::Tensor grad_input = at::empty({0}, input.options()), grad_weight = at::empty({0}, weight.options());
  if (output_mask[0] || output_mask[1]) {
    auto grads = at::convolution_backward(grad_y, input, weight, std::nullopt, stride, padding, dilation, false, {0, 0},
                                          groups, {output_mask[0], output_mask[1], false});
    if (output_mask[0]) grad_input = std::get<0>(grads).contiguous(input.suggest_memory_format());
    if (output_mask[1]) grad_weight = std::get<1>(grads).contiguous(weight.suggest_memory_format());
  }
  if (!output_mask[2]) return {grad_input, grad_weight, at::empty({0}, mean.options()), at::empty({0}, mean.options())};
  if (!grad_gamma.defined()) grad_gamma = at::empty({0}, mean.options());
  return {grad_input, grad_weight, grad_gamma, grad_beta};
}

}  // namespace rk
