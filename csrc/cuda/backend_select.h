// The fused ops on CUDA with the run-time choice of backend (backend_choice.h): the project's kernels (the host
// launchers) or the library path (library_path.h), whichever measured faster for the problem. Shared by the real
// CUDA registrations (conv_bn_relu.cu: CUDA events time the candidates) and the emulated ones (emu_module.cpp:
// injected times only, the emulator's speed meaning nothing).
#pragma once
#include <ATen/Context.h>

#include "common/path_scope.h"
#include "cuda/backend_choice.h"
#include "cuda/bn_train_host.h"
#include "cuda/conv_bn_relu_host.h"
#include "cuda/library_path.h"

namespace rk {

constexpr const char* kLibraryScope = "resnext_kernels::cudnn";  // the library path, chosen at run time

enum class FusedForm : int64_t { kInference = 0, kTraining = 1, kBackward = 2 };

// Everything the choice depends on: form, device, shapes, strides, padding, dilation, groups, dtype, layout, ReLU and
// whether float32 may take TF32.
inline BackendChooser::Key backend_key(FusedForm form, int64_t device, at::IntArrayRef input_size,
                                       at::IntArrayRef weight_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                       at::IntArrayRef dilation, int64_t groups, at::ScalarType dtype,
                                       bool channels_last, bool relu) {
  BackendChooser::Key k{int64_t(form), device};
  for (at::IntArrayRef v : {input_size, weight_size, stride, padding, dilation}) k.insert(k.end(), v.begin(), v.end());
  k.insert(k.end(), {groups, int64_t(dtype), int64_t(channels_last), int64_t(relu),
                     int64_t(at::globalContext().allowTF32CuDNN())});
  return k;
}

inline BackendChooser::Key backend_key(FusedForm form, const at::Tensor& input, const at::Tensor& weight,
                                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                       int64_t groups, bool relu) {
  return backend_key(form, input.device().index(), input.sizes(), weight.sizes(), stride, padding, dilation, groups,
                     input.scalar_type(), input.suggest_memory_format() == at::MemoryFormat::ChannelsLast, relu);
}

// TimerFactory: (run_ours, run_library) -> BackendChooser::Timer. can_time: not inside a CUDA graph capture.
template <typename TimerFactory>
at::Tensor select_infer(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& scale,
                        const at::Tensor& shift, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, int64_t groups, bool relu, cudaStream_t stream, bool can_time,
                        const TimerFactory& timer) {
  auto ours = [&] {
    return conv_bn_relu_infer_cuda_host(input, weight, scale, shift, stride, padding, dilation, groups, relu, stream);
  };
  auto library = [&] {
    const PathScope scope(kLibraryScope);
    return library_infer(input, weight, scale, shift, stride, padding, dilation, groups, relu);
  };
  const BackendChoice c = BackendChooser::instance().choose(
      backend_key(FusedForm::kInference, input, weight, stride, padding, dilation, groups, relu), can_time,
      at::globalContext().deterministicAlgorithms(), timer(ours, library));
  return c.backend == CudaBackend::kOurs ? ours() : library();
}

template <typename TimerFactory>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> select_train(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, double eps, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu, cudaStream_t stream, bool can_time,
    const TimerFactory& timer) {
  auto ours = [&] {
    return conv_bn_relu_train_cuda_host(input, weight, bn_weight, bn_bias, eps, stride, padding, dilation, groups, relu,
                                        stream);
  };
  auto library = [&] {
    const PathScope scope(kLibraryScope);
    return library_train(input, weight, bn_weight, bn_bias, eps, stride, padding, dilation, groups, relu);
  };
  const BackendChoice c = BackendChooser::instance().choose(
      backend_key(FusedForm::kTraining, input, weight, stride, padding, dilation, groups, relu), can_time,
      at::globalContext().deterministicAlgorithms(), timer(ours, library));
  return c.backend == CudaBackend::kOurs ? ours() : library();
}

template <typename TimerFactory>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> select_train_backward(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& conv_out,
    const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, double eps, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu, std::array<bool, 3> output_mask, cudaStream_t stream,
    bool can_time, const TimerFactory& timer) {
  auto ours = [&] {
    return conv_bn_relu_train_backward_cuda_host(grad_out, input, weight, conv_out, mean, var, bn_weight, bn_bias, eps,
                                                 stride, padding, dilation, groups, relu, output_mask, stream);
  };
  auto library = [&] {
    const PathScope scope(kLibraryScope);
    return library_train_backward(grad_out, input, weight, conv_out, mean, var, bn_weight, bn_bias, eps, stride,
                                  padding, dilation, groups, relu, output_mask);
  };
  const BackendChoice c = BackendChooser::instance().choose(
      backend_key(FusedForm::kBackward, input, weight, stride, padding, dilation, groups, relu), can_time,
      at::globalContext().deterministicAlgorithms(), timer(ours, library));
  return c.backend == CudaBackend::kOurs ? ours() : library();
}

// explain()'s view of a problem's choice: (backend: "ours", "cudnn" or "" when not decided yet, ours ms, library ms,
// reason). Sizes as the op gets them.
inline std::tuple<std::string, double, double, std::string> backend_lookup(
    int64_t form, int64_t device, at::IntArrayRef input_size, at::IntArrayRef weight_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, at::ScalarType dtype, bool channels_last,
    bool relu) {
  const BackendMode mode = backend_mode();
  if (mode != BackendMode::kAuto) {
    return {mode == BackendMode::kOurs ? "ours" : "cudnn", -1.0, -1.0, std::string("forced by ") + kCudaBackendEnv};
  }
  if (at::globalContext().deterministicAlgorithms()) {
    return {"ours", -1.0, -1.0, "torch.use_deterministic_algorithms is on: the project's kernels, without timing"};
  }
  const auto c = BackendChooser::instance().lookup(backend_key(FusedForm(form), device, input_size, weight_size, stride,
                                                               padding, dilation, groups, dtype, channels_last, relu));
  if (!c) return {"", -1.0, -1.0, "not timed yet: the first call times the project's kernels against cuDNN"};
  return {c->backend == CudaBackend::kOurs ? "ours" : "cudnn", c->ours_ms, c->library_ms, c->reason};
}

}  // namespace rk
