// CPU kernels of the training form of the fused op: BatchNorm with batch statistics, and its backward.
//
// Forward:  y = conv2d(input, weight) with the fused conv kernel (NHWC, input dtype), whose epilogue also sums
//           each output row's deviations from the row's first value (and their squares) per channel; those
//           row sums are merged into the batch mean and variance (merge_row_stats), and one pass writes
//           out = relu?(y * a + b) with a = gamma / sqrt(var + eps), b = beta - mean * a. So y is written once
//           and read once in the forward.
// Backward: one pass forms the ReLU mask from (y, a, b) exactly as the forward did and reduces
//           sum(g) and sum(g * xhat) per channel; a second pass writes
//           grad_y = gamma * invstd * (g - sum(g) / M - xhat * sum(g * xhat) / M); the convolution's gradients
//           come from where plan_cpu_conv_grads says (conv_plan.h): the data gradient from the forward kernel run
//           on grad_y (conv_data_grad) or ATen, the weight gradient from conv_wgrad.cpp or ATen.
//
// Determinism: each output row's statistics are computed by one thread in a fixed order, and rows are merged in
// row order; the backward's per-channel reductions run over fixed blocks of kStatBlock pixels merged in float64
// in block order. Results are bitwise identical run to run and for any number of threads. Numerics: no
// E[y^2] - E[y]^2 anywhere; within a row the sums are of deviations from one of the row's values, across rows
// Chan's formula merges (count, mean, sum of squared deviations) in float64.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "common/conv_checks.h"
#include "common/path_scope.h"
#include "cpu/conv_cpu.h"
#include "cpu/isa.h"
#include "cpu/row_stats.h"

namespace rk {
namespace cpu {
namespace {

constexpr int64_t kStatBlock = 256;  // pixels per partial reduction

// Row kernels of the BN + ReLU passes: one NHWC pixel row of C channels, plain functions over restrict pointers
// with the ReLU switch a template parameter, so the loops vectorize and the ReLU mask is a vector select (a run-time
// branch on the mask compiles to scalar code that mispredicts on random signs).
template <bool kRelu, typename scalar_t, typename acc_t>
void normalize_relu_row(const scalar_t* __restrict y, const acc_t* __restrict a, const acc_t* __restrict b,
                        scalar_t* __restrict out, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const acc_t z = static_cast<acc_t>(y[c]) * a[c] + b[c];
    out[c] = static_cast<scalar_t>(kRelu && z < acc_t(0) ? acc_t(0) : z);  // NaN passes, as torch.relu
  }
}

// The gradient reaching the BN output: g where the forward's ReLU passed (z > 0, z computed exactly as the
// forward computed it), else 0.
template <bool kRelu, typename acc_t>
inline acc_t relu_masked(acc_t g, acc_t v, acc_t a, acc_t b) {
  return (!kRelu || v * a + b > acc_t(0)) ? g : acc_t(0);
}

// sum_g[c] += g, sum_gy[c] += g * (y - mean) over one row.
template <bool kRelu, typename scalar_t, typename acc_t>
void bn_backward_sums_row(const scalar_t* __restrict y, const scalar_t* __restrict g, const acc_t* __restrict a,
                          const acc_t* __restrict b, const acc_t* __restrict mean, acc_t* __restrict sum_g,
                          acc_t* __restrict sum_gy, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const acc_t v = static_cast<acc_t>(y[c]);
    const acc_t gi = relu_masked<kRelu>(static_cast<acc_t>(g[c]), v, a[c], b[c]);
    sum_g[c] += gi;
    sum_gy[c] += gi * (v - mean[c]);
  }
}

// grad_y = k1 * g - k2 - k3 * (y - mean) over one row.
template <bool kRelu, typename scalar_t, typename acc_t>
void bn_backward_input_row(const scalar_t* __restrict y, const scalar_t* __restrict g, const acc_t* __restrict a,
                           const acc_t* __restrict b, const acc_t* __restrict mean, const acc_t* __restrict k1,
                           const acc_t* __restrict k2, const acc_t* __restrict k3, scalar_t* __restrict out,
                           int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const acc_t v = static_cast<acc_t>(y[c]);
    const acc_t gi = relu_masked<kRelu>(static_cast<acc_t>(g[c]), v, a[c], b[c]);
    out[c] = static_cast<scalar_t>(k1[c] * gi - k2[c] - k3[c] * (v - mean[c]));
  }
}

// The elementwise passes over rows [r0, r1) of C channels, one entry point per dtype compiled for AVX-512, AVX2 and
// baseline x86-64 with runtime dispatch (target_clones needs plain functions; the row kernels inline into each).
#define RK_DEFINE_ROW_PASSES(scalar_t, acc_t)                                                                      \
  RK_CPU_ISA_CLONES void normalize_rows(const scalar_t* y, const acc_t* a, const acc_t* b, scalar_t* out,          \
                                        int64_t C, bool relu, int64_t r0, int64_t r1) {                            \
    for (int64_t r = r0; r < r1; ++r) {                                                                            \
      if (relu) normalize_relu_row<true>(y + r * C, a, b, out + r * C, C);                                         \
      else normalize_relu_row<false>(y + r * C, a, b, out + r * C, C);                                             \
    }                                                                                                              \
  }                                                                                                                \
  RK_CPU_ISA_CLONES void bn_backward_input_rows(const scalar_t* y, const scalar_t* g, const acc_t* a,              \
                                                const acc_t* b, const acc_t* mean, const acc_t* k1, const acc_t* k2, \
                                                const acc_t* k3, scalar_t* out, int64_t C, bool relu, int64_t r0,   \
                                                int64_t r1) {                                                      \
    for (int64_t r = r0; r < r1; ++r) {                                                                            \
      if (relu) bn_backward_input_row<true>(y + r * C, g + r * C, a, b, mean, k1, k2, k3, out + r * C, C);         \
      else bn_backward_input_row<false>(y + r * C, g + r * C, a, b, mean, k1, k2, k3, out + r * C, C);             \
    }                                                                                                              \
  }                                                                                                                \
  RK_CPU_ISA_CLONES void bn_backward_sums_rows(const scalar_t* y, const scalar_t* g, const acc_t* a, const acc_t* b, \
                                               const acc_t* mean, acc_t* sum_g, acc_t* sum_gy, int64_t C, bool relu, \
                                               int64_t r0, int64_t r1) {                                           \
    for (int64_t r = r0; r < r1; ++r) {                                                                            \
      if (relu) bn_backward_sums_row<true>(y + r * C, g + r * C, a, b, mean, sum_g, sum_gy, C);                    \
      else bn_backward_sums_row<false>(y + r * C, g + r * C, a, b, mean, sum_g, sum_gy, C);                        \
    }                                                                                                              \
  }
RK_DEFINE_ROW_PASSES(float, float)
RK_DEFINE_ROW_PASSES(double, double)
RK_DEFINE_ROW_PASSES(c10::BFloat16, float)
#undef RK_DEFINE_ROW_PASSES

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Per-channel double vector of an optional BN parameter (`fill` when absent).
std::vector<double> channel_values(const std::optional<at::Tensor>& t, int64_t C, double fill) {
  std::vector<double> v(C, fill);
  if (t.has_value() && t->defined()) {
    const at::Tensor d = t->to(at::kDouble).contiguous();
    const double* p = d.data_ptr<double>();
    std::copy(p, p + C, v.begin());
  }
  return v;
}

// Reduces per-channel sums over fixed pixel blocks: f(r0, r1, p) adds pixel rows [r0, r1)'s contribution to the
// block partial p (width * C values of acc_t, contiguous over channels so f vectorizes). A block has at most
// kStatBlock pixels, so acc_t (float) partials lose nothing measurable; the block partials are merged in
// float64, in block order, which makes the result independent of the number of threads.
template <typename acc_t, typename F>
std::vector<double> reduce_channels(int64_t M, int64_t C, int64_t width, const F& f) {
  const int64_t nblocks = (M + kStatBlock - 1) / kStatBlock;
  std::vector<acc_t> partial(nblocks * C * width, acc_t(0));
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      acc_t* p = partial.data() + b * C * width;
      f(b * kStatBlock, std::min(M, (b + 1) * kStatBlock), p);
    }
  });
  std::vector<double> total(C * width, 0.0);
  for (int64_t b = 0; b < nblocks; ++b) {
    const acc_t* p = partial.data() + b * C * width;
    for (int64_t i = 0; i < C * width; ++i) total[i] += static_cast<double>(p[i]);
  }
  return total;
}

// The affine map of the normalization, in the accumulation type, shared by forward and backward so that
// the backward's ReLU mask is exactly the forward's.
template <typename acc_t>
struct NormAffine {
  std::vector<acc_t> a, b;  // y * a + b
  std::vector<double> invstd;
};

template <typename acc_t>
NormAffine<acc_t> norm_affine(const double* mean, const double* var, const std::vector<double>& gamma,
                              const std::vector<double>& beta, double eps, int64_t C) {
  NormAffine<acc_t> n{std::vector<acc_t>(C), std::vector<acc_t>(C), std::vector<double>(C)};
  for (int64_t c = 0; c < C; ++c) {
    n.invstd[c] = 1.0 / std::sqrt(var[c] + eps);
    const double a = gamma[c] * n.invstd[c];
    n.a[c] = static_cast<acc_t>(a);
    n.b[c] = static_cast<acc_t>(beta[c] - mean[c] * a);
  }
  return n;
}

std::vector<double> tensor_to_doubles(const at::Tensor& t) {
  const at::Tensor d = t.to(at::kDouble).contiguous();
  return std::vector<double>(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
}

at::Tensor doubles_to_tensor(const std::vector<double>& v, const at::TensorOptions& options) {
  at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, options.dtype(at::kDouble));
  std::copy(v.begin(), v.end(), t.data_ptr<double>());
  return t;
}

// Data gradient of a stride-1 convolution, dX = conv2d(grad_y, W flipped and transposed within each group), by the
// forward kernel's plan for it (GradPlan::data_plan): a channels_last tensor of grad_y's dtype.
at::Tensor conv_data_grad(const ConvGeom& g, const GradPlan& plan, const at::Tensor& grad_y,
                              const at::Tensor& weight) {
  TORCH_INTERNAL_ASSERT(g.stride_h == 1 && g.stride_w == 1, "conv_data_grad: stride-1 convolutions only");
  const ConvGeom& t = plan.data_geom;
  // W'[group * c_in + i][j][kh][kw] = W[group * c_out + j][i][KH - 1 - kh][KW - 1 - kw]
  const int64_t G = g.groups, c_in = g.C_in / G, c_out = g.C_out / G;
  const at::Tensor w_t = weight.reshape({G, c_out, c_in, g.KH, g.KW})
                             .transpose(1, 2)
                             .flip({3, 4})
                             .reshape({g.C_in, c_out, g.KH, g.KW})
                             .contiguous();
  return conv_affine_nhwc_cpu(plan.data_plan, t, grad_y, w_t, at::Tensor(), at::Tensor(), std::nullopt,
                              /*relu=*/false);
}


void check_train_bn_args(const char* op, const at::Tensor& input, const ConvGeom& g,
                         const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
                         double eps) {
  if (bn_weight.has_value() && bn_weight->defined()) check_channel_vector(op, "bn_weight", *bn_weight, input, g.C_out);
  if (bn_bias.has_value() && bn_bias->defined()) check_channel_vector(op, "bn_bias", *bn_bias, input, g.C_out);
  TORCH_CHECK(eps > 0, op, ": eps must be > 0, got ", eps);
  TORCH_CHECK(g.N * g.OH * g.OW > 1, op, ": Expected more than 1 value per channel when training, got ",
              g.N * g.OH * g.OW);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_train_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, double eps, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu) {
  constexpr const char* op = "resnext_kernels::conv_bn_relu_train";
  const ConvGeom g = check_conv_args(op, input, weight, stride, padding, dilation, groups);
  check_train_bn_args(op, input, g, bn_weight, bn_bias, eps);
  const at::ScalarType acc = acc_type_of(input.scalar_type());
  const int64_t C = g.C_out, M = g.N * g.OH * g.OW;
  at::Tensor row_stats;
  const at::Tensor conv_out = conv_affine_nhwc_cpu(g, input, weight, at::Tensor(), at::Tensor(), std::nullopt, false,
                                                   &row_stats);
  at::Tensor out = at::empty_like(conv_out);
  std::vector<double> mean(C, 0.0), var(C, 0.0);
  if (row_stats.defined()) merge_row_stats(row_stats, g.OW, M, mean, var);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "conv_bn_relu_train_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* y = conv_out.data_ptr<scalar_t>();
    const NormAffine<acc_t> n = norm_affine<acc_t>(mean.data(), var.data(), channel_values(bn_weight, C, 1.0),
                                                   channel_values(bn_bias, C, 0.0), eps, C);
    scalar_t* o = out.data_ptr<scalar_t>();
    const acc_t* __restrict na = n.a.data();
    const acc_t* __restrict nb = n.b.data();
    at::parallel_for(0, M, std::max<int64_t>(1, 4096 / C), [&](int64_t r0, int64_t r1) {
      normalize_rows(y, na, nb, o, C, relu, r0, r1);
    });
  });
  const at::TensorOptions acc_options = input.options().dtype(acc);
  return {out.contiguous(conv_output_memory_format(input, weight)), conv_out,
          doubles_to_tensor(mean, acc_options).to(acc), doubles_to_tensor(var, acc_options).to(acc)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_train_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& conv_out,
    const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, double eps, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu, std::array<bool, 3> output_mask) {
  constexpr const char* op = "resnext_kernels::conv_bn_relu_train_backward";
  const ConvGeom g = check_conv_args(op, input, weight, stride, padding, dilation, groups);
  check_train_bn_args(op, input, g, bn_weight, bn_bias, eps);
  const int64_t C = g.C_out, M = g.N * g.OH * g.OW;
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({g.N, C, g.OH, g.OW}), op, ": grad_out has shape ",
              grad_out.sizes(), ", expected the output's [", g.N, ", ", C, ", ", g.OH, ", ", g.OW, "]");
  TORCH_CHECK(conv_out.sizes() == grad_out.sizes() && conv_out.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                  conv_out.scalar_type() == input.scalar_type(),
              op, ": conv_out must be the channels_last conv output saved by conv_bn_relu_train");
  check_channel_vector(op, "mean", mean, input, C);
  check_channel_vector(op, "var", var, input, C);
  const at::Tensor go = grad_out.to(input.scalar_type()).contiguous(at::MemoryFormat::ChannelsLast);
  const std::vector<double> mean_d = tensor_to_doubles(mean), var_d = tensor_to_doubles(var);
  const std::vector<double> gamma = channel_values(bn_weight, C, 1.0), beta = channel_values(bn_bias, C, 0.0);
  at::Tensor grad_y = (output_mask[0] || output_mask[1]) ? at::empty_like(conv_out) : at::Tensor();
  std::vector<double> sums;  // [sum g | sum g * xhat]
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "conv_bn_relu_train_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const NormAffine<acc_t> n = norm_affine<acc_t>(mean_d.data(), var_d.data(), gamma, beta, eps, C);
    const scalar_t* y = conv_out.data_ptr<scalar_t>();
    const scalar_t* gop = go.data_ptr<scalar_t>();
    const std::vector<acc_t> mean_acc(mean_d.begin(), mean_d.end());
    const acc_t* __restrict mu = mean_acc.data();
    const acc_t* __restrict na = n.a.data();
    const acc_t* __restrict nb = n.b.data();
    // sums[c] = sum(g), sums[C + c] = sum(g * (y - mean)) (times invstd below: sum(g * xhat))
    sums = reduce_channels<acc_t>(M, C, 2, [&](int64_t r0, int64_t r1, acc_t* p) {
      bn_backward_sums_rows(y, gop, na, nb, mu, p, p + C, C, relu, r0, r1);
    });
    for (int64_t c = 0; c < C; ++c) sums[C + c] *= n.invstd[c];
    std::vector<acc_t> k1(C), k2(C), k3(C);  // grad_y = k1 * g - k2 - k3 * (y - mean)
    for (int64_t c = 0; c < C; ++c) {
      const double s = gamma[c] * n.invstd[c];
      k1[c] = static_cast<acc_t>(s);
      k2[c] = static_cast<acc_t>(s * sums[c] / double(M));
      k3[c] = static_cast<acc_t>(s * sums[C + c] / double(M) * n.invstd[c]);
    }
    const acc_t* __restrict q1 = k1.data();
    const acc_t* __restrict q2 = k2.data();
    const acc_t* __restrict q3 = k3.data();
    if (!output_mask[0] && !output_mask[1]) return;  // only the BN parameter gradients: no grad_y pass
    scalar_t* gy = grad_y.data_ptr<scalar_t>();
    at::parallel_for(0, M, std::max<int64_t>(1, 4096 / C), [&](int64_t r0, int64_t r1) {
      bn_backward_input_rows(y, gop, na, nb, mu, q1, q2, q3, gy, C, relu, r0, r1);
    });
  });
  at::Tensor grad_input, grad_weight;
  const GradPlan plan = plan_cpu_conv_grads(g, input.scalar_type());
  const bool own_weight_grad = output_mask[1] && plan.weight != WeightGradSource::kAten;
  const bool own_data_grad = output_mask[0] && plan.data != DataGradSource::kAten;
  const bool aten_data = output_mask[0] && !own_data_grad, aten_weight = output_mask[1] && !own_weight_grad;
  if (aten_data || aten_weight) {  // one call for both: a scope for each gradient it computes
    std::optional<PathScope> data_scope, weight_scope;
    if (aten_data) data_scope.emplace(grad_scope(DataGradSource::kAten));
    if (aten_weight) weight_scope.emplace(grad_scope(WeightGradSource::kAten));
    auto grads = at::convolution_backward(grad_y, input, weight, std::nullopt, stride, padding, dilation,
                                          /*transposed=*/false, /*output_padding=*/{0, 0}, groups,
                                          {aten_data, aten_weight, false});
    if (aten_data) grad_input = std::get<0>(grads);
    if (aten_weight) grad_weight = std::get<1>(grads);
  }
  if (own_data_grad) {
    const PathScope scope(grad_scope(plan.data));
    grad_input = conv_data_grad(g, plan, grad_y, weight);
  }
  if (output_mask[0]) grad_input = grad_input.contiguous(input.suggest_memory_format());
  if (own_weight_grad) {
    const PathScope scope(grad_scope(plan.weight));
    grad_weight = conv_weight_grad_cpu(g, plan.wgrad, input, grad_y);
  }
  if (output_mask[1]) grad_weight = grad_weight.contiguous(weight.suggest_memory_format());
  const at::TensorOptions acc_options = input.options().dtype(acc_type_of(input.scalar_type()));
  auto empty = [&](const at::TensorOptions& o) { return at::empty({0}, o); };
  at::Tensor grad_gamma = empty(acc_options), grad_beta = empty(acc_options);
  if (output_mask[2]) {
    grad_beta = doubles_to_tensor(std::vector<double>(sums.begin(), sums.begin() + C), acc_options)
                    .to(acc_options.dtype());
    grad_gamma = doubles_to_tensor(std::vector<double>(sums.begin() + C, sums.end()), acc_options)
                     .to(acc_options.dtype());
  }
  return {output_mask[0] ? grad_input : empty(input.options()), output_mask[1] ? grad_weight : empty(weight.options()),
          grad_gamma, grad_beta};
}

}  // namespace
}  // namespace cpu
}  // namespace rk

TORCH_LIBRARY_IMPL(resnext_kernels, CPU, m) {
  m.impl("conv_bn_relu_train", &rk::cpu::conv_bn_relu_train_cpu);
  m.impl("conv_bn_relu_train_backward", &rk::cpu::conv_bn_relu_train_backward_cpu);
}
