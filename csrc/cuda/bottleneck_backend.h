// The CUDA backend of bottleneck_infer (common/bottleneck_impl.h), shared by the real CUDA build
// (bottleneck_cuda.cpp, cuDNN) and the emulated build (csrc/emu, ATen on the CPU standing in for cuDNN), so the
// routing and the BatchNorm folding the emulator tests are the ones a GPU runs. Kernel-free: g++ compiles it.
//
// Routing per convolution:
//   * dense 1x1 (conv1, conv3, the projection): a GEMM, cuDNN's job. BatchNorm's scale is folded into the
//     weight (per output channel, in float32/float64, then rounded to the weight dtype, as inductor's
//     freezing folds it) and its shift becomes the convolution bias, so cuDNN's fused epilogues apply it:
//     conv+bias+ReLU for conv1, conv+bias+add(shortcut)+ReLU for conv3. The projection has no ReLU and
//     runs as conv + bias (ATen adds a cuDNN convolution's bias in a separate pass, on the first block of a
//     stage only).
//   * the grouped 3x3: the project's fused kernel (scale/shift/ReLU in its fp32 epilogue) wherever it covers
//     the shape (conv_bn_relu_fwd_plan), else cuDNN with folded weights like the 1x1s.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "common/conv_geometry.h"

namespace rk {

// Conv ops of one device: `Ops` supplies
//   static const char* grouped_unsupported(const ConvGeom&, at::ScalarType);        // nullptr: covered
//   static at::Tensor grouped(const char* op, const ConvGeom&, x, w, scale, shift, bool relu);  // our kernel
//   static at::Tensor conv_bias(x, w, bias, const ConvGeom&, const at::Tensor* residual, bool relu);
// where conv_bias computes relu?(conv(x, w) + bias (+ residual)) with the epilogue fused where the device can.
template <typename Ops>
struct CudaBlockBackend {
  static at::Tensor conv_affine(const char* op, const ConvGeom& g, const at::Tensor& input, const at::Tensor& weight,
                                const at::Tensor& scale, const at::Tensor& shift, const at::Tensor* residual,
                                bool relu) {
    const bool dense_pointwise = g.KH == 1 && g.KW == 1 && g.groups == 1;
    if (!dense_pointwise && residual == nullptr && Ops::grouped_unsupported(g, input.scalar_type()) == nullptr) {
      return Ops::grouped(op, g, input, weight, scale, shift, relu);
    }
    const at::MemoryFormat cl = at::MemoryFormat::ChannelsLast;
    const at::Tensor folded =
        weight.to(scale.scalar_type()).mul(scale.view({-1, 1, 1, 1})).to(weight.scalar_type()).contiguous(cl);
    const at::Tensor bias = shift.to(input.scalar_type());
    if (residual != nullptr) {
      const at::Tensor z = residual->to(input.scalar_type()).contiguous(cl);
      return Ops::conv_bias(input.contiguous(cl), folded, bias, g, &z, relu);
    }
    return Ops::conv_bias(input.contiguous(cl), folded, bias, g, nullptr, relu);
  }
};

}  // namespace rk
