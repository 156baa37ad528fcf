// Host side of the training form on CUDA (conv_bn_relu_train and its backward), shared by the real CUDA
// build and the emulated build. The convolution runs the fused forward kernel (identity affine), the
// statistics and the BN + ReLU backward run the kernels of kernels/bn_train.cuh. The convolution's data
// gradient comes from ATen (cuDNN on a GPU). Its weight gradient comes from the deterministic tensor-core kernel
// (kernels/conv_wgrad_tc.cuh) wherever the tensor-core plan covers the problem (float16/bfloat16, as the forward);
// elsewhere from ATen, except under torch.use_deterministic_algorithms(True), where the deterministic CUDA-core
// kernels of kernels/conv_wgrad.cuh run (3x3 and 1x1 kernels; cuDNN's own deterministic algorithms otherwise).
// The CUDA-core ones are not the default because they have not been timed against cuDNN on a GPU.
#pragma once
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>

#include <optional>
#include <tuple>

#include "common/path_scope.h"
#include "cuda/conv_bn_relu_host.h"
#include "cuda/conv_wgrad_tc_host.h"
#include "cuda/cuda_plan.h"
#include "cuda/kernels/bn_train.cuh"
#include "cuda/kernels/conv_wgrad.cuh"

namespace rk {
namespace train_detail {

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
}

inline at::Tensor channel_vector(const std::optional<at::Tensor>& t, const at::Tensor& input, int64_t C,
                                 at::ScalarType acc, const char* op, const char* name) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  check_channel_vector(op, name, *t, input, C);
  return t->to(acc).contiguous();
}

template <typename Acc>
const Acc* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<Acc>() : nullptr;
}

// Runs the per-channel reduction `what` and its finalization over y (and grad) viewed as M x C.
template <typename T, typename Acc>
void reduce_and_finalize(const char* op, const at::Tensor& y, const at::Tensor* grad, int64_t M, int64_t C,
                         cuda_kernels::Partial what, cuda_kernels::Finalize fin, bool relu, double eps,
                         const at::Tensor& gamma, const at::Tensor& beta, at::Tensor& mean, at::Tensor& var,
                         at::Tensor& a, at::Tensor& b, at::Tensor* k, at::Tensor* grads, cudaStream_t stream) {
  using namespace cuda_kernels;
  const int64_t nblocks = (M + kStatRows - 1) / kStatRows;
  const int width = what == Partial::kBackward ? 2 : 1;
  at::Tensor partial = at::empty({nblocks * width * C}, y.options().dtype(c10::CppTypeToScalarType<Acc>::value));
  const dim3 grid(unsigned(nblocks), unsigned((C + kStatThreads - 1) / kStatThreads));
  check_launch(launch_kernel(channel_partials_kernel<T, Acc>, grid, dim3(kStatThreads), 0, stream,
                             reinterpret_cast<const T*>(y.const_data_ptr()),
                             grad ? reinterpret_cast<const T*>(grad->const_data_ptr()) : nullptr,
                             ptr_or_null<Acc>(mean), ptr_or_null<Acc>(a), ptr_or_null<Acc>(b), M, C, what, relu,
                             partial.mutable_data_ptr<Acc>()),
               op);
  Acc* none = nullptr;
  check_launch(launch_kernel(channel_finalize_kernel<Acc>, dim3(unsigned((C + 127) / 128)), dim3(128), 0, stream,
                             partial.const_data_ptr<Acc>(), nblocks, M, C, fin, eps, ptr_or_null<Acc>(gamma),
                             ptr_or_null<Acc>(beta), mean.mutable_data_ptr<Acc>(), var.mutable_data_ptr<Acc>(),
                             a.defined() ? a.mutable_data_ptr<Acc>() : none, b.defined() ? b.mutable_data_ptr<Acc>() : none,
                             k ? k[0].mutable_data_ptr<Acc>() : none, k ? k[1].mutable_data_ptr<Acc>() : none,
                             k ? k[2].mutable_data_ptr<Acc>() : none, grads ? grads[0].mutable_data_ptr<Acc>() : none,
                             grads ? grads[1].mutable_data_ptr<Acc>() : none),
               op);
}

template <typename T, typename Acc>
void affine_only(const char* op, int64_t C, double eps, const at::Tensor& gamma, const at::Tensor& beta,
                 at::Tensor& mean, at::Tensor& var, at::Tensor& a, at::Tensor& b, cudaStream_t stream) {
  using namespace cuda_kernels;
  Acc* none = nullptr;
  check_launch(launch_kernel(channel_finalize_kernel<Acc>, dim3(unsigned((C + 127) / 128)), dim3(128), 0, stream,
                             static_cast<const Acc*>(nullptr), int64_t(0), int64_t(0), C, Finalize::kAffine, eps,
                             ptr_or_null<Acc>(gamma), ptr_or_null<Acc>(beta), mean.mutable_data_ptr<Acc>(),
                             var.mutable_data_ptr<Acc>(), a.mutable_data_ptr<Acc>(), b.mutable_data_ptr<Acc>(), none,
                             none, none, none, none),
               op);
}

inline unsigned elementwise_blocks(int64_t n) { return unsigned((n + 255) / 256); }

// Elements all the weight-gradient partial sums of one call may take.
constexpr int64_t kWgradPartialBudget = int64_t(16) << 20;

// The weight gradient by the deterministic kernels (TAPS = KH * KW of 9 or 1), in the weight's dtype, contiguous.
template <typename T, typename Acc>
at::Tensor weight_grad_cuda(const char* op, const ConvGeom& g, const at::Tensor& input, const at::Tensor& grad_y,
                            cudaStream_t stream) {
  using namespace cuda_kernels;
  const int64_t taps = int64_t(g.KH) * g.KW, cpg_in = g.C_in / g.groups, cpg_out = g.C_out / g.groups;
  at::Tensor grad_weight = at::empty({g.C_out, cpg_in, g.KH, g.KW}, input.options());
  const int64_t M = g.N * g.OH * g.OW;
  if (grad_weight.numel() == 0) return grad_weight;
  const int64_t per_chunk = taps * cpg_out * g.C_in;
  const int64_t chunk = wgrad_chunk_pixels(M, per_chunk, kWgradPartialBudget);
  const int64_t n_chunks = M > 0 ? (M + chunk - 1) / chunk : 0;
  at::Tensor partial = at::empty({n_chunks * per_chunk}, input.options().dtype(c10::CppTypeToScalarType<Acc>::value));
  if (n_chunks > 0) {
    const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
    const dim3 grid(unsigned(n_chunks), unsigned((g.C_in + 32 * kWgradWarps - 1) / (32 * kWgradWarps)),
                    unsigned((cpg_out + kWgradJ - 1) / kWgradJ));
    const dim3 block(32, kWgradWarps);
    const T* xp = reinterpret_cast<const T*>(x.const_data_ptr());
    const T* gp = reinterpret_cast<const T*>(grad_y.const_data_ptr());
    Acc* pp = partial.mutable_data_ptr<Acc>();
    check_launch(taps == 9 ? launch_kernel(weight_grad_partial_kernel<9, T, Acc>, grid, block, 0, stream, g, xp, gp,
                                           chunk, pp)
                           : launch_kernel(weight_grad_partial_kernel<1, T, Acc>, grid, block, 0, stream, g, xp, gp,
                                           chunk, pp),
                 op);
  }
  check_launch(launch_kernel(weight_grad_finalize_kernel<T, Acc>, dim3(elementwise_blocks(grad_weight.numel())),
                             dim3(256), 0, stream, g, static_cast<const Acc*>(partial.const_data_ptr<Acc>()), n_chunks,
                             reinterpret_cast<T*>(grad_weight.mutable_data_ptr())),
               op);
  return grad_weight;
}

template <typename F>
void dispatch_train_types(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kFloat: f(float(), float()); break;
    case at::kDouble: f(double(), double()); break;
    case at::kHalf: f(__half(), float()); break;
    default: f(__nv_bfloat16(), float()); break;
  }
}

}  // namespace train_detail

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_train_cuda_host(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, double eps, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu, cudaStream_t stream) {
  using namespace train_detail;
  constexpr const char* op = "resnext_kernels::conv_bn_relu_train (CUDA kernel)";
  const ConvGeom g = check_conv_args(op, input, weight, stride, padding, dilation, groups);
  const int64_t C = g.C_out, M = g.N * g.OH * g.OW;
  TORCH_CHECK(eps > 0, op, ": eps must be > 0, got ", eps);
  TORCH_CHECK(M > 1, op, ": Expected more than 1 value per channel when training, got ", M);
  const at::ScalarType acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::TensorOptions acc_opts = input.options().dtype(acc);
  const at::Tensor gamma = channel_vector(bn_weight, input, C, acc, op, "bn_weight");
  const at::Tensor beta = channel_vector(bn_bias, input, C, acc, op, "bn_bias");
  cuda_kernels::TcPlan tc;
  if (conv_tc_unsupported_reason(g, input.scalar_type(), &tc) == nullptr) {
    // Tensor cores: the statistics come from the convolution's epilogue, y is read once more to normalize.
    std::optional<PathScope> conv_scope(kCudaTcScope);
    auto [y, mean, var, a, b] =
        conv_tc_train(op, g, tc, input.contiguous(at::MemoryFormat::ChannelsLast), weight, gamma, beta, eps, stream);
    conv_scope.reset();
    const PathScope scope(kCudaBnStatsScope);
    const at::Tensor out = normalize_relu_vec8(op, y, a, b, relu, stream);
    return {out.contiguous(conv_output_memory_format(input, weight)), y, mean, var};
  }
  const at::Tensor y = conv_affine_nhwc_cuda(op, g, input, weight, at::ones({C}, acc_opts), at::zeros({C}, acc_opts),
                                             false, stream);
  at::Tensor mean = at::empty({C}, acc_opts), var = at::empty({C}, acc_opts);
  at::Tensor a = at::empty({C}, acc_opts), b = at::empty({C}, acc_opts);
  at::Tensor out = at::empty_like(y);
  const PathScope scope(kCudaBnStatsScope);
  dispatch_train_types(input.scalar_type(), [&](auto t, auto acc_v) {
    using T = decltype(t);
    using Acc = decltype(acc_v);
    reduce_and_finalize<T, Acc>(op, y, nullptr, M, C, cuda_kernels::Partial::kSum, cuda_kernels::Finalize::kMean, relu,
                                eps, gamma, beta, mean, var, a, b, nullptr, nullptr, stream);
    reduce_and_finalize<T, Acc>(op, y, nullptr, M, C, cuda_kernels::Partial::kSquaredDeviation,
                                cuda_kernels::Finalize::kVariance, relu, eps, gamma, beta, mean, var, a, b, nullptr,
                                nullptr, stream);
    check_launch(launch_kernel(cuda_kernels::normalize_relu_kernel<T, Acc>, dim3(elementwise_blocks(M * C)), dim3(256), 0,
                               stream, reinterpret_cast<const T*>(y.const_data_ptr()), a.const_data_ptr<Acc>(),
                               b.const_data_ptr<Acc>(), M, C, relu, reinterpret_cast<T*>(out.mutable_data_ptr())),
                 op);
  });
  return {out.contiguous(conv_output_memory_format(input, weight)), y, mean, var};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_train_backward_cuda_host(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& conv_out,
    const at::Tensor& mean_in, const at::Tensor& var_in, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, double eps, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu, std::array<bool, 3> output_mask, cudaStream_t stream) {
  using namespace train_detail;
  constexpr const char* op = "resnext_kernels::conv_bn_relu_train_backward (CUDA kernel)";
  const ConvGeom g = check_conv_args(op, input, weight, stride, padding, dilation, groups);
  const int64_t C = g.C_out, M = g.N * g.OH * g.OW;
  TORCH_CHECK(M > 1, op, ": Expected more than 1 value per channel when training, got ", M);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({g.N, C, g.OH, g.OW}), op, ": grad_out has shape ",
              grad_out.sizes(), ", expected the output's");
  TORCH_CHECK(conv_out.sizes() == grad_out.sizes() && conv_out.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                  conv_out.scalar_type() == input.scalar_type(),
              op, ": conv_out must be the channels_last conv output saved by conv_bn_relu_train");
  check_channel_vector(op, "mean", mean_in, input, C);
  check_channel_vector(op, "var", var_in, input, C);
  const at::ScalarType acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::TensorOptions acc_opts = input.options().dtype(acc);
  const at::Tensor gamma = channel_vector(bn_weight, input, C, acc, op, "bn_weight");
  const at::Tensor beta = channel_vector(bn_bias, input, C, acc, op, "bn_bias");
  at::Tensor mean = mean_in.to(acc).contiguous().clone(), var = var_in.to(acc).contiguous().clone();
  const at::Tensor go = grad_out.to(input.scalar_type()).contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor a = at::empty({C}, acc_opts), b = at::empty({C}, acc_opts);
  at::Tensor k[3] = {at::empty({C}, acc_opts), at::empty({C}, acc_opts), at::empty({C}, acc_opts)};
  at::Tensor bn_grads[2] = {at::empty({C}, acc_opts), at::empty({C}, acc_opts)};  // gamma, beta
  at::Tensor grad_y = at::empty_like(conv_out);
  std::optional<PathScope> bn_scope(kCudaBnBackwardScope);
  const at::ScalarType dt = input.scalar_type();
  if ((dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat) && C % 8 == 0) {  // 16-byte passes over y, grad
    using namespace cuda_kernels;
    const Vec8Plan plan = vec8_plan(M, C);
    at::Tensor partial = at::empty({plan.grid_x * 2 * C}, acc_opts);
    tc_detail::dispatch_tc(input.scalar_type(), [&](auto t) {
      using T = decltype(t);
      affine_only<T, float>(op, C, eps, gamma, beta, mean, var, a, b, stream);
      const dim3 grid(unsigned(plan.grid_x), unsigned(plan.grid_y));
      const T* yp = reinterpret_cast<const T*>(conv_out.const_data_ptr());
      const T* gp = reinterpret_cast<const T*>(go.const_data_ptr());
      check_launch(launch_kernel(bn_backward_sums_vec8_kernel<T>, grid, dim3(kVec8Threads),
                                 vec8_smem_bytes(plan, 3), stream, yp, gp, mean.const_data_ptr<float>(),
                                 a.const_data_ptr<float>(), b.const_data_ptr<float>(), M, C, relu, plan,
                                 partial.mutable_data_ptr<float>()),
                   op);
      float* none = nullptr;
      check_launch(launch_kernel(channel_finalize_kernel<float>, dim3(unsigned((C + 127) / 128)), dim3(128), 0, stream,
                                 partial.const_data_ptr<float>(), plan.grid_x, M, C, Finalize::kBackward, eps,
                                 ptr_or_null<float>(gamma), ptr_or_null<float>(beta), mean.mutable_data_ptr<float>(),
                                 var.mutable_data_ptr<float>(), none, none, k[0].mutable_data_ptr<float>(),
                                 k[1].mutable_data_ptr<float>(), k[2].mutable_data_ptr<float>(),
                                 bn_grads[0].mutable_data_ptr<float>(), bn_grads[1].mutable_data_ptr<float>()),
                   op);
      const size_t smem6 = vec8_smem_bytes(plan, 6);  // above 48 KiB at 2048 channels a block
      if (smem6 > 48 * 1024) check_launch(set_max_dynamic_smem(bn_relu_backward_vec8_kernel<T>, smem6), op);
      check_launch(launch_kernel(bn_relu_backward_vec8_kernel<T>, grid, dim3(kVec8Threads), smem6, stream, yp, gp,
                                 mean.const_data_ptr<float>(), a.const_data_ptr<float>(), b.const_data_ptr<float>(),
                                 k[0].const_data_ptr<float>(), k[1].const_data_ptr<float>(),
                                 k[2].const_data_ptr<float>(), M, C, relu, plan,
                                 reinterpret_cast<T*>(grad_y.mutable_data_ptr())),
                   op);
    });
  } else {
    dispatch_train_types(input.scalar_type(), [&](auto t, auto acc_v) {
      using T = decltype(t);
      using Acc = decltype(acc_v);
      affine_only<T, Acc>(op, C, eps, gamma, beta, mean, var, a, b, stream);
      reduce_and_finalize<T, Acc>(op, conv_out, &go, M, C, cuda_kernels::Partial::kBackward,
                                  cuda_kernels::Finalize::kBackward, relu, eps, gamma, beta, mean, var, a, b, k,
                                  bn_grads, stream);
      check_launch(launch_kernel(cuda_kernels::bn_relu_backward_kernel<T, Acc>, dim3(elementwise_blocks(M * C)),
                                 dim3(256), 0, stream, reinterpret_cast<const T*>(conv_out.const_data_ptr()),
                                 reinterpret_cast<const T*>(go.const_data_ptr()), mean.const_data_ptr<Acc>(),
                                 a.const_data_ptr<Acc>(), b.const_data_ptr<Acc>(), k[0].const_data_ptr<Acc>(),
                                 k[1].const_data_ptr<Acc>(), k[2].const_data_ptr<Acc>(), M, C, relu,
                                 reinterpret_cast<T*>(grad_y.mutable_data_ptr())),
                   op);
    });
  }
  at::Tensor grad_input = at::empty({0}, input.options()), grad_weight = at::empty({0}, weight.options());
  cuda_kernels::WgradTcPlan wgrad_tc;
  const WeightGradSource wgrad_source =
      cuda_weight_grad_source(g, input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16,
                              at::globalContext().deterministicAlgorithms(), &wgrad_tc);
  const bool own_weight_grad = output_mask[1] && wgrad_source != WeightGradSource::kAten;
  bn_scope.reset();
  // The data gradient on the tensor cores where they cover it (stride 1: the forward kernel on grad_y).
  ConvGeom gd;
  cuda_kernels::TcPlan dplan;
  const bool tc_grad_input =
      output_mask[0] && conv_tc_data_grad_unsupported_reason(g, input.scalar_type(), &gd, &dplan) == nullptr;
  if (tc_grad_input) {
    const PathScope scope(kCudaTcDgradScope);
    grad_input = conv_tc_data_grad(op, g, gd, dplan, grad_y, weight, stream).contiguous(input.suggest_memory_format());
  }
  const bool aten_grad_input = output_mask[0] && !tc_grad_input;
  if (aten_grad_input || (output_mask[1] && !own_weight_grad)) {
    std::optional<PathScope> data_scope, weight_scope;
    if (aten_grad_input) data_scope.emplace(kAtenDgradScope);
    if (output_mask[1] && !own_weight_grad) weight_scope.emplace(kAtenWgradScope);
    auto grads = at::convolution_backward(grad_y, input, weight, std::nullopt, stride, padding, dilation, false, {0, 0},
                                          groups, {aten_grad_input, output_mask[1] && !own_weight_grad, false});
    if (aten_grad_input) grad_input = std::get<0>(grads).contiguous(input.suggest_memory_format());
    if (output_mask[1] && !own_weight_grad) grad_weight = std::get<1>(grads).contiguous(weight.suggest_memory_format());
  }
  if (own_weight_grad && wgrad_source == WeightGradSource::kTensorCores) {
    const PathScope scope(kCudaTcWgradScope);
    grad_weight = conv_wgrad_tc(op, g, wgrad_tc, input, grad_y, stream).contiguous(weight.suggest_memory_format());
  } else if (own_weight_grad) {
    const PathScope scope(kCudaWgradScope);
    dispatch_train_types(input.scalar_type(), [&](auto t, auto acc_v) {
      grad_weight = weight_grad_cuda<decltype(t), decltype(acc_v)>(op, g, input, grad_y, stream);
    });
    grad_weight = grad_weight.contiguous(weight.suggest_memory_format());
  }
  if (!output_mask[2]) bn_grads[0] = bn_grads[1] = at::empty({0}, acc_opts);
  return {grad_input, grad_weight, bn_grads[0], bn_grads[1]};
}

}  // namespace rk
