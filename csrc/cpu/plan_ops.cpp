// The private planner ops (schemas.h): _cpu_config, _plan_conv (conv_plan.h) and _plan_cuda_conv (cuda/cuda_plan.h).
// They take sizes, not tensors, and need no GPU: the CUDA rule is host arithmetic, compiled into every build, so that
// explain() and the tests ask the same code the launchers run.
#include <ATen/Context.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "common/conv_checks.h"
#include "cpu/conv_plan.h"
#include "cuda/cuda_plan.h"

namespace rk {
namespace {

using PlanResult = std::tuple<std::string, std::string, std::vector<std::string>, std::vector<int64_t>, std::string,
                              std::string, std::string>;

std::tuple<std::string, std::string, std::string, bool, bool> cpu_config() {
  const cpu::CpuInfo& info = cpu::cpu_info();
  return {cpu::isa_name(info.isa), cpu::isa_name(info.supported), cpu::vendor_name(info.vendor), info.native_bf16,
          cpu::aten_routes_enabled()};
}

PlanResult plan_conv(at::IntArrayRef input_size, at::IntArrayRef weight_size, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, at::ScalarType dtype,
                     c10::string_view form_name) {
  constexpr const char* op = "resnext_kernels::_plan_conv";
  const ConvGeom g = make_conv_geometry(op, input_size, weight_size, stride, padding, dilation, groups);
  cpu::ConvForm form;
  if (form_name == "inference") form = cpu::ConvForm::kInference;
  else if (form_name == "residual") form = cpu::ConvForm::kResidual;
  else if (form_name == "training") form = cpu::ConvForm::kTraining;
  else TORCH_CHECK(false, op, ": form must be 'inference', 'residual' or 'training', got '", std::string(form_name),
                   "'");
  const cpu::ConvPlan plan = cpu::plan_cpu_conv(g, dtype, form);
  PlanResult r;
  std::get<0>(r) = cpu::path_name(plan.path);
  std::get<1>(r) = cpu::describe(plan);
  for (const auto& [name, value] : cpu::parameters(plan)) {
    std::get<2>(r).push_back(name);
    std::get<3>(r).push_back(value);
  }
  if (form == cpu::ConvForm::kTraining) {
    const cpu::GradPlan grads = cpu::plan_cpu_conv_grads(g, dtype);
    std::get<4>(r) = cpu::grad_name(grads.data);
    std::get<5>(r) = cpu::grad_name(grads.weight);
    std::get<6>(r) = cpu::describe(grads);
  }
  return r;
}

// The geometry with unknown sizes (-1) replaced by the smallest valid ones: the CUDA rule's size-dependent limits
// (grid counts) are then not checked, and the launcher checks them at run time. They bind only past 2^31 output
// tiles, far beyond what a GPU's memory holds.
std::vector<int64_t> known_sizes(at::IntArrayRef input_size, at::IntArrayRef weight_size, at::IntArrayRef padding,
                                 at::IntArrayRef dilation) {
  std::vector<int64_t> in(input_size.begin(), input_size.end());
  if (in.size() == 4 && weight_size.size() == 4 && padding.size() == 2 && dilation.size() == 2) {
    if (in[0] < 0) in[0] = 1;
    for (int i = 0; i < 2; ++i) {
      if (in[2 + i] < 0) in[2 + i] = std::max<int64_t>(1, dilation[i] * (weight_size[2 + i] - 1) + 1 - 2 * padding[i]);
    }
  }
  return in;
}

PlanResult plan_cuda_conv(at::IntArrayRef input_size, at::IntArrayRef weight_size, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, at::ScalarType dtype,
                          bool training) {
  constexpr const char* op = "resnext_kernels::_plan_cuda_conv";
  const std::vector<int64_t> in = known_sizes(input_size, weight_size, padding, dilation);
  const ConvGeom g = make_conv_geometry(op, in, weight_size, stride, padding, dilation, groups);
  PlanResult r;
  cuda_kernels::FwdPlan plan;
  const size_t acc_bytes = dtype == at::kDouble ? sizeof(double) : sizeof(float);
  const char* why = cuda_kernels::conv_bn_relu_fwd_plan(g, acc_bytes, &plan);
  if (why != nullptr) {
    std::get<0>(r) = "aten";
    std::get<1>(r) = why;
    return r;
  }
  constexpr size_t skip = sizeof("resnext_kernels::") - 1;
  const int elem = cuda_kernels::conv_tc_elem_bytes(dtype == at::kHalf || dtype == at::kBFloat16, dtype == at::kFloat,
                                                    at::globalContext().allowTF32CuDNN());
  cuda_kernels::TcPlan tc;
  const char* tc_why = cuda_kernels::conv_tc_plan(g, elem, &tc);
  if (tc_why == nullptr) {
    std::get<0>(r) = kCudaTcScope + skip;
    std::get<1>(r) = std::string("the project's tensor-core kernel (implicit GEMM on mma.sync, ") +
                     (elem == 4 ? "TF32" : "16-bit") + " operands, fp32 accumulation): " +
                     std::to_string(tc.tn * tc.th * tc.tw) + " output pixels x 64 channels per CTA";
    std::get<2>(r) = {"tile_h", "tile_w", "images", "ksteps", "smem_bytes"};
    std::get<3>(r) = {tc.th, tc.tw, tc.tn, tc.ksteps, int64_t(tc.smem_bytes)};
  } else {
    std::get<0>(r) = kCudaDirectScope + skip;
    std::get<1>(r) = std::string("the project's direct kernel (CUDA cores; ") + tc_why + "): 8x8 output pixels x 32 "
                     "output channels per block, input tile and weights staged in shared memory";
    std::get<2>(r) = {"ci_tile", "smem_bytes"};
    std::get<3>(r) = {plan.ci_tile, int64_t(plan.smem_bytes)};
  }
  if (training) {
    const bool deterministic = at::globalContext().deterministicAlgorithms();
    cuda_kernels::WgradTcPlan wplan;
    const WeightGradSource source =
        cuda_weight_grad_source(g, dtype == at::kHalf || dtype == at::kBFloat16, deterministic, &wplan);
    ConvGeom gd;
    cuda_kernels::TcPlan dplan;
    const bool tc_dgrad = cuda_kernels::conv_tc_data_grad_plan(g, elem, &gd, &dplan) == nullptr;
    std::get<4>(r) = (tc_dgrad ? kCudaTcDgradScope : kAtenDgradScope) + skip;
    const char* wgrad_path = source == WeightGradSource::kTensorCores    ? kCudaTcWgradScope
                             : source == WeightGradSource::kDeterministic ? kCudaWgradScope
                                                                          : kAtenWgradScope;
    std::get<5>(r) = wgrad_path + skip;
    std::string wgrad_why;
    if (source == WeightGradSource::kTensorCores) {
      wgrad_why = "the project's tensor-core kernel (deterministic, " + std::to_string(wplan.bw) + "x" +
                  std::to_string(wplan.bw) + " channel blocks, " + std::to_string(wplan.chunks) + " pixel chunk" +
                  (wplan.chunks == 1 ? ")" : "s)");
    } else if (source == WeightGradSource::kDeterministic) {
      wgrad_why = "the project's deterministic CUDA kernels (torch.use_deterministic_algorithms is on)";
    } else {
      wgrad_why = "cuDNN";
    }
    std::get<6>(r) = "conv weight gradient from " + wgrad_why + ", data gradient from " +
                     (tc_dgrad ? "the tensor-core kernel on grad_y (stride 1: each group's kernel transposed)" : "cuDNN");
  }
  return r;
}

}  // namespace
}  // namespace rk

TORCH_LIBRARY_IMPL(resnext_kernels, CompositeExplicitAutograd, m) {
  m.impl("_cpu_config", &rk::cpu_config);
  m.impl("_plan_conv", &rk::plan_conv);
  m.impl("_plan_cuda_conv", &rk::plan_cuda_conv);
}
