// Geometry of one fused grouped convolution, shared by the CPU kernels, the CUDA kernels and the
// CUDA-on-CPU emulator. Deliberately torch-free and POD so that nvcc device code, g++ host code and the
// emulator can all include it.
//
// Conventions used by every kernel of the project:
//   input   NHWC contiguous, [N][H][W][C_in]
//   weight  torch's [C_out][C_in / groups][KH][KW] with any strides for the CPU kernels (their packers read through
//           the strides); OHWI contiguous, [C_out][KH][KW][C_in / groups] (weight.permute(0, 2, 3, 1)), for the CUDA
//           kernel
//   output  NHWC contiguous, [N][OH][OW][C_out]
//   scale, shift  per output channel, accumulation type (float for fp16/bf16/fp32, double for fp64)
// Output channel co belongs to group co / (C_out / groups) and reads input channels
// [g * C_in/groups, (g + 1) * C_in/groups).
#pragma once
#include <stdint.h>

namespace rk {

struct ConvGeom {
  int64_t N, H, W, C_in;  // input
  int64_t OH, OW, C_out;  // output
  int32_t KH, KW;
  int32_t stride_h, stride_w;
  int32_t pad_h, pad_w;
  int32_t dil_h, dil_w;
  int32_t groups;
};

inline int64_t conv_out_size(int64_t in, int64_t k, int64_t stride, int64_t pad, int64_t dil) {
  return (in + 2 * pad - dil * (k - 1) - 1) / stride + 1;
}

}  // namespace rk
