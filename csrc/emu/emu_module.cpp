// resnext_kernels._emu: the project's CUDA host launchers and kernels compiled by g++ against the CUDA-on-CPU
// emulator, registered for CPU tensors in the `resnext_kernels_emu` namespace, so tests run the very code a
// GPU runs (launch configuration included) without a GPU. Also the emulator's schedule controls.
#include <Python.h>
#include <torch/library.h>

#include <ATen/ops/convolution.h>

#include "common/bottleneck_impl.h"
#include "cuda/backend_select.h"
#include "cuda/bn_train_host.h"
#include "cuda/bottleneck_backend.h"
#include "cuda/conv_bn_relu_host.h"
#include "cuda/conv_wgrad_tc_host.h"
#include "schemas.h"

extern "C" {
PyMODINIT_FUNC PyInit__emu(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_emu", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {

// The emulator times nothing (its speed means nothing): the run-time choice takes injected times
// (_backend_fake_times), and without them runs the project's kernels, undecided.
struct NoTimer {
  template <typename Ours, typename Library>
  rk::BackendChooser::Timer operator()(Ours&, Library&) const {
    return [](rk::CudaBackend) -> double { TORCH_CHECK(false, "the emulator times only with injected times"); };
  }
};

bool can_time() { return rk::BackendChooser::instance().fake(); }

at::Tensor conv_bn_relu_infer_emulated(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& scale,
                                       const at::Tensor& shift, at::IntArrayRef stride, at::IntArrayRef padding,
                                       at::IntArrayRef dilation, int64_t groups, bool relu) {
  TORCH_CHECK(input.device().is_cpu(), "resnext_kernels_emu: the emulated CUDA ops take CPU tensors");
  return rk::select_infer(input, weight, scale, shift, stride, padding, dilation, groups, relu, /*stream=*/nullptr,
                          can_time(), NoTimer());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_train_emulated(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, double eps, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu) {
  TORCH_CHECK(input.device().is_cpu(), "resnext_kernels_emu: the emulated CUDA ops take CPU tensors");
  return rk::select_train(input, weight, bn_weight, bn_bias, eps, stride, padding, dilation, groups, relu,
                          /*stream=*/nullptr, can_time(), NoTimer());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_train_backward_emulated(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& conv_out,
    const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, double eps, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu, std::array<bool, 3> output_mask) {
  TORCH_CHECK(input.device().is_cpu(), "resnext_kernels_emu: the emulated CUDA ops take CPU tensors");
  return rk::select_train_backward(grad_out, input, weight, conv_out, mean, var, bn_weight, bn_bias, eps, stride,
                                   padding, dilation, groups, relu, output_mask, /*stream=*/nullptr, can_time(),
                                   NoTimer());
}

void backend_fake_times(double ours_ms, double library_ms) {
  rk::BackendChooser::instance().set_fake_times(ours_ms, library_ms);
}

void backend_reset() {
  rk::BackendChooser::instance().clear_fake_times();
  rk::BackendChooser::instance().clear();
}

int64_t backend_timed() { return rk::BackendChooser::instance().timed(); }

std::tuple<std::string, double, double, std::string> backend_lookup(
    int64_t form, int64_t device, at::IntArrayRef input_size, at::IntArrayRef weight_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, at::ScalarType dtype, bool channels_last,
    bool relu) {
  return rk::backend_lookup(form, device, input_size, weight_size, stride, padding, dilation, groups, dtype,
                            channels_last, relu);
}

// The CUDA block backend with ATen on the CPU standing in for cuDNN's fused epilogues (same arithmetic: a
// convolution with folded weights, + bias, + residual, ReLU) and the emulated kernel for the grouped conv.
struct EmulatedCudaOps {
  static const char* grouped_unsupported(const rk::ConvGeom& g, at::ScalarType dtype) {
    return rk::conv_bn_relu_cuda_unsupported_reason(g, dtype);
  }

  static at::Tensor grouped(const char* op, const rk::ConvGeom& g, const at::Tensor& x, const at::Tensor& w,
                            const at::Tensor& scale, const at::Tensor& shift, bool relu) {
    return rk::conv_affine_nhwc_cuda(op, g, x, w, scale, shift, relu, /*stream=*/nullptr);
  }

  static at::Tensor conv_bias(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                              const rk::ConvGeom& g, const at::Tensor* residual, bool relu) {
    at::Tensor y = at::convolution(x, w, bias, {g.stride_h, g.stride_w}, {g.pad_h, g.pad_w}, {g.dil_h, g.dil_w},
                                   false, {0, 0}, g.groups);
    if (residual != nullptr) y.add_(*residual);
    return relu ? y.relu_() : y;
  }
};

at::Tensor bottleneck_infer_emulated(const at::Tensor& input, const at::Tensor& w1, const at::Tensor& s1,
                                     const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& s2,
                                     const at::Tensor& b2, const at::Tensor& w3, const at::Tensor& s3,
                                     const at::Tensor& b3, const std::optional<at::Tensor>& w_down,
                                     const std::optional<at::Tensor>& s_down,
                                     const std::optional<at::Tensor>& b_down, int64_t stride, int64_t groups,
                                     int64_t dilation) {
  TORCH_CHECK(input.device().is_cpu(), "resnext_kernels_emu: the emulated CUDA ops take CPU tensors");
  return rk::bottleneck_infer_impl<rk::CudaBlockBackend<EmulatedCudaOps>>(
      "resnext_kernels_emu::bottleneck_infer", input, w1, s1, b1, w2, s2, b2, w3, s3, b3, w_down, s_down, b_down,
      stride, groups, dilation);
}

void set_schedule(c10::string_view order, int64_t seed) {
  rk::emu::BlockOrder o;
  if (order == "forward") o = rk::emu::BlockOrder::kForward;
  else if (order == "reverse") o = rk::emu::BlockOrder::kReverse;
  else if (order == "random") o = rk::emu::BlockOrder::kRandom;
  else TORCH_CHECK(false, "resnext_kernels_emu.set_schedule: order must be 'forward', 'reverse' or 'random', got '",
                   std::string(order), "'");
  rk::emu::set_schedule(o, static_cast<uint64_t>(seed));
}

std::vector<int64_t> launch_stats() {
  const auto s = rk::emu::launch_stats();
  return {int64_t(s.launches), int64_t(s.blocks), int64_t(s.threads), int64_t(s.barriers), int64_t(s.warp_ops)};
}

std::string profile_stop() { return rk::emu::profile_stop(); }

// The tensor-core weight gradient alone, for its tests: grad_y and input as the training backward passes them;
// block_width 16 or 32 forces the kernel's variant, 0 lets the plan choose.
at::Tensor conv_weight_grad_tc_emulated(const at::Tensor& grad_y, const at::Tensor& input, const at::Tensor& weight,
                                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                        int64_t groups, int64_t block_width) {
  constexpr const char* op = "resnext_kernels_emu::conv_weight_grad_tc";
  TORCH_CHECK(input.device().is_cpu(), op, ": the emulated CUDA ops take CPU tensors");
  const rk::ConvGeom g = rk::check_conv_args(op, input, weight, stride, padding, dilation, groups);
  TORCH_CHECK(grad_y.sizes() == at::IntArrayRef({g.N, g.C_out, g.OH, g.OW}) &&
                  grad_y.scalar_type() == input.scalar_type(),
              op, ": grad_y must have the convolution output's shape and the input's dtype");
  rk::cuda_kernels::WgradTcPlan plan;
  TORCH_CHECK(block_width == 0 || block_width == 16 || block_width == 32, op, ": block_width is 0, 16 or 32");
  const char* why = rk::conv_wgrad_tc_unsupported_reason(g, input.scalar_type(), &plan, int(block_width));
  TORCH_CHECK(why == nullptr, op, ": not covered: ", why ? why : "");
  return rk::conv_wgrad_tc(op, g, plan, input, grad_y, /*stream=*/nullptr);
}

// The weight-gradient plan's choices for these shapes (no kernel runs): block width, blocks, chunks, sub-tiles per
// chunk and the sub-tile (images, rows, columns).
std::vector<int64_t> conv_weight_grad_tc_plan(const at::Tensor& input, const at::Tensor& weight,
                                              at::IntArrayRef stride, at::IntArrayRef padding,
                                              at::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "resnext_kernels_emu::conv_weight_grad_tc_plan";
  const rk::ConvGeom g = rk::check_conv_args(op, input, weight, stride, padding, dilation, groups);
  rk::cuda_kernels::WgradTcPlan plan;
  const char* why = rk::conv_wgrad_tc_unsupported_reason(g, input.scalar_type(), &plan);
  TORCH_CHECK(why == nullptr, op, ": not covered: ", why ? why : "");
  return {plan.bw, plan.blocks, plan.chunks, plan.chunk_subtiles, plan.tn, plan.th, plan.tw};
}

std::string unsupported_reason(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const rk::ConvGeom g = rk::check_conv_args("resnext_kernels_emu::cuda_unsupported_reason", input, weight, stride,
                                             padding, dilation, groups);
  const char* why = rk::conv_bn_relu_cuda_unsupported_reason(g, input.scalar_type());
  return why ? why : "";
}

}  // namespace

TORCH_LIBRARY(resnext_kernels_emu, m) {
  m.def(RK_SCHEMA_CONV_BN_RELU_INFER);
  m.def(RK_SCHEMA_CONV_BN_RELU_TRAIN);
  m.def(RK_SCHEMA_CONV_BN_RELU_TRAIN_BACKWARD);
  m.def(RK_SCHEMA_BOTTLENECK_INFER);
  m.def("set_schedule(str order, int seed) -> ()", &set_schedule);
  m.def("launch_stats() -> int[]", &launch_stats);
  m.def("counters_built() -> bool", &rk::emu::counters_built);
  m.def("profile_start() -> ()", &rk::emu::profile_start);
  m.def("profile_stop() -> str", &profile_stop);
  m.def("conv_weight_grad_tc(Tensor grad_y, Tensor input, Tensor weight, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups, int block_width=0) -> Tensor");
  m.def("conv_weight_grad_tc_plan(Tensor input, Tensor weight, int[2] stride, int[2] padding, int[2] dilation, "
        "int groups) -> int[]",
        &conv_weight_grad_tc_plan);
  m.def("cuda_unsupported_reason(Tensor input, Tensor weight, int[2] stride, int[2] padding, int[2] dilation, "
        "int groups) -> str",
        &unsupported_reason);
  // The run-time choice of backend (csrc/cuda/backend_choice.h), with injected times.
  m.def("_backend_fake_times(float ours_ms, float library_ms) -> ()", &backend_fake_times);
  m.def("_backend_reset() -> ()", &backend_reset);
  m.def("_backend_timed() -> int", &backend_timed);
  m.def(RK_SCHEMA_CUDA_BACKEND, &backend_lookup);
}

TORCH_LIBRARY_IMPL(resnext_kernels_emu, CPU, m) {
  m.impl("conv_bn_relu_infer", &conv_bn_relu_infer_emulated);
  m.impl("conv_bn_relu_train", &conv_bn_relu_train_emulated);
  m.impl("conv_bn_relu_train_backward", &conv_bn_relu_train_backward_emulated);
  m.impl("bottleneck_infer", &bottleneck_infer_emulated);
  m.impl("conv_weight_grad_tc", &conv_weight_grad_tc_emulated);
}
