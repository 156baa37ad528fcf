// Launch plan of the CUDA conv_bn_relu_fwd_kernel (conv_bn_relu_fwd.cuh): its tiling constants and the coverage rule.
// Plain C++ (no CUDA or torch headers), so that the CPU build's planner op (csrc/cpu/plan_ops.cpp) runs the same rule
// without a GPU: explain() and the tests ask it.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "../../common/conv_geometry.h"

namespace rk {
namespace cuda_kernels {

constexpr int kTile = 8;                 // output pixels per tile side
constexpr int kThreads = 256;
constexpr int kChannelsPerBlock = 32;
constexpr int kPixels = kTile * kTile;   // 64
constexpr int kChannelsPerThread = kChannelsPerBlock * kPixels / kThreads;  // 8
constexpr size_t kMaxSharedBytes = 48 * 1024;

struct FwdPlan {
  int ci_tile;
  int in_tile_h, in_tile_w;  // staged input rows / columns (with halo)
  int64_t tiles_h, tiles_w;
  size_t smem_bytes;
  int64_t grid_x, grid_y;
};

// Plans a launch; returns nullptr and fills `plan`, or a reason the kernel does not cover the case.
inline const char* conv_bn_relu_fwd_plan(const ConvGeom& g, size_t acc_bytes, FwdPlan* plan) {
  plan->in_tile_h = (kTile - 1) * g.stride_h + (g.KH - 1) * g.dil_h + 1;
  plan->in_tile_w = (kTile - 1) * g.stride_w + (g.KW - 1) * g.dil_w + 1;
  plan->tiles_h = (g.OH + kTile - 1) / kTile;
  plan->tiles_w = (g.OW + kTile - 1) / kTile;
  plan->grid_x = g.N * plan->tiles_h * plan->tiles_w;
  plan->grid_y = (g.C_out + kChannelsPerBlock - 1) / kChannelsPerBlock;
  if (plan->grid_x > 2147483647LL) return "more than 2^31 - 1 output tiles (a grid.x limit of the CUDA kernel)";
  if (plan->grid_y > 65535) return "more than 65535 chunks of 32 output channels (a grid.y limit)";
  for (int ci_tile = 16; ci_tile >= 1; ci_tile /= 2) {
    const size_t elems = size_t(ci_tile) * plan->in_tile_h * plan->in_tile_w +
                         size_t(kChannelsPerBlock) * g.KH * g.KW * ci_tile;
    if (elems * acc_bytes <= kMaxSharedBytes) {
      plan->ci_tile = ci_tile;
      plan->smem_bytes = elems * acc_bytes;
      return nullptr;
    }
  }
  return "the dilated kernel and stride need more than 48 KiB of shared memory for one input channel";
}

}  // namespace cuda_kernels
}  // namespace rk
