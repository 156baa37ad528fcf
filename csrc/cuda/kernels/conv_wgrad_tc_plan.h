// Launch plan of the tensor-core weight gradient (conv_wgrad_tc.cuh): its blocks, sub-tiles and pixel chunks. Plain
// C++ (no CUDA or torch headers): the host launcher and the CPU build's planner op (csrc/cpu/plan_ops.cpp, which
// explain() asks) run the same rule.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "../../common/conv_geometry.h"
#include "conv_tc_plan.h"

namespace rk {
namespace cuda_kernels {

constexpr int kWtThreads = 128;
constexpr int kWtWarps = kWtThreads / 32;
constexpr int kWtNarrow = 16, kWtWide = 32;   // output and input channels of a CTA's weight block (bw)
constexpr int kWtMaxPixels = 256;             // output pixels of a sub-tile
constexpr int kWtStages = 3;                  // sub-tiles in shared memory: one used, two in flight
constexpr size_t kWtStageBytes = 24 * 1024;   // the most one sub-tile's input and grad_y rows may take
constexpr int64_t kWtTargetCtas = 132;        // a CTA per SM of the largest GPU (H100 SXM): chunks up to that many,
constexpr int64_t kWtPartialShare = 8;        // unless the partial sums would pass 1/8 of the bytes of x and grad_y

struct WgradTcPlan {
  int th, tw, tn;            // sub-tile: tn images x th rows x tw columns of output pixels
  int in_th, in_tw;          // its input tile per image, with the halo
  int planes, plane_w, plane_px, img_px;  // 2 column planes at stride 2; rows per plane row, plane, image
  int pixels, ksteps;        // tn * th * tw; k16 steps (pixels rounded up to 16)
  int x_rows;                // shared-memory rows of the input tile (tn * img_px)
  int taps, cpg, bw, cw;     // KH * KW; channels per group; block width; input channels per output channel of it
  int64_t tiles_h, tiles_w, subtiles;  // sub-tiles per image, over the batch
  int64_t blocks, chunks, chunk_subtiles;  // grid.x; grid.y; sub-tiles per chunk
  size_t x_bytes, stage_bytes, table_offset, smem_bytes;
};

// The plan with blocks of bw channels (a covered problem; bw 32 needs groups of 32 or 64), or the reason there is
// none.
inline const char* conv_wgrad_tc_plan_width(const ConvGeom& g, int bw, WgradTcPlan* plan) {
  WgradTcPlan p{};
  const int s = g.stride_h;
  p.taps = g.KH * g.KW;
  p.cpg = int(g.C_in / g.groups);
  p.bw = bw;
  p.cw = p.cpg < p.bw ? p.cpg : p.bw;
  p.planes = s == 2 ? 2 : 1;
  int th, tw, tn;
  conv_tc_tile_shape(g, kWtMaxPixels, &th, &tw, &tn);
  // A stage: the input tile's 2 bw-byte rows (a multiple of 128 bytes, where the swizzle repeats), then grad_y's.
  auto plan_stage = [&](int h, int n) {
    p.th = h;
    p.tn = n;
    conv_tc_input_tile(g, h, tw, &p.in_th, &p.in_tw, &p.plane_w);
    p.plane_px = p.in_th * p.plane_w;
    p.img_px = p.planes * p.plane_px;
    p.x_rows = n * p.img_px;
    p.pixels = n * h * tw;
    p.ksteps = (p.pixels + 15) / 16;
    p.x_bytes = (size_t(p.x_rows) * 2 * p.bw + 127) / 128 * 128;
    p.stage_bytes = p.x_bytes + size_t(p.ksteps) * 16 * 2 * p.bw;
    return p.stage_bytes <= kWtStageBytes;
  };
  if (!conv_tc_fit_tile(&th, &tn, plan_stage)) {
    return "the tensor-core weight gradient's input tile does not fit its shared memory";
  }
  p.tw = tw;
  p.tiles_h = (g.OH + p.th - 1) / p.th;
  p.tiles_w = (g.OW + p.tw - 1) / p.tw;
  p.subtiles = (g.N + p.tn - 1) / p.tn * p.tiles_h * p.tiles_w;
  p.blocks = g.C_out / p.bw * (p.cpg <= p.bw ? 1 : p.cpg / p.bw);  // groups of 64: 2 x 2 blocks each
  // Chunks: enough CTAs to fill the GPU, while the partial sums (written once, read once) stay small next to x and
  // grad_y; never more than the sub-tiles. A single chunk writes the weight gradient directly.
  const int64_t partial_bytes = g.C_out * p.cpg * p.taps * int64_t(sizeof(float));
  const int64_t act_bytes = (g.N * g.H * g.W + g.N * g.OH * g.OW) * g.C_in * 2;
  int64_t chunks = kWtTargetCtas / p.blocks;
  const int64_t affordable = act_bytes / (kWtPartialShare * partial_bytes);
  if (chunks > affordable) chunks = affordable;
  if (chunks > p.subtiles) chunks = p.subtiles;
  if (chunks < 1) chunks = 1;
  p.chunk_subtiles = p.subtiles > 0 ? (p.subtiles + chunks - 1) / chunks : 1;
  p.chunks = p.subtiles > 0 ? (p.subtiles + p.chunk_subtiles - 1) / p.chunk_subtiles : 1;
  // Shared memory: the stages, then the row tables (input rows, pixel octets and their base rows); the epilogue
  // reuses the stages for the narrow warps' accumulators and the staged block (its skew: 32 floats a row at most).
  p.table_offset = kWtStages * p.stage_bytes;
  const size_t tables = (size_t(p.x_rows) + 4 * size_t(p.ksteps)) * sizeof(int);
  const size_t dump = p.bw == kWtNarrow ? size_t(kWtWarps) * 2 * p.taps * 32 * 4 * sizeof(float) : 0;
  const size_t epilogue = dump + size_t(p.bw) * (p.cw * p.taps + 32) * sizeof(float);
  p.smem_bytes = p.table_offset + tables > epilogue ? p.table_offset + tables : epilogue;
  if (p.blocks > 2147483647LL) return "more than 2^31 - 1 weight blocks (a grid.x limit)";
  if (p.chunks > 65535) return "more than 65535 chunks (a grid.y limit)";
  *plan = p;
  return nullptr;
}

// The reason the tensor-core weight gradient does not cover a problem, or nullptr with `plan` filled. Groups of 32
// and 64 take wide blocks when these keep nearly every SM busy without more chunks (partial sums) than narrow ones:
// they move about 0.65x the shared-memory bytes per multiply-add, but are 4x fewer. `width` 16 or 32 forces the
// block width (tests).
inline const char* conv_wgrad_tc_plan(const ConvGeom& g, bool half, WgradTcPlan* plan, int width = 0) {
  if (!half) return "the tensor-core weight gradient takes float16 and bfloat16";
  if (const char* why = conv_tc_geometry_coverage(g)) return why;
  const bool wide_ok = g.C_in / g.groups >= kWtWide;
  if (width == kWtWide && !wide_ok) return "the tensor-core weight gradient's wide blocks take groups of 32 or 64";
  WgradTcPlan narrow, wide;
  if (width != kWtWide) {
    if (const char* why = conv_wgrad_tc_plan_width(g, kWtNarrow, &narrow)) return why;
    if (width == kWtNarrow || !wide_ok || conv_wgrad_tc_plan_width(g, kWtWide, &wide) != nullptr) {
      *plan = narrow;
      return nullptr;
    }
    auto busy = [](const WgradTcPlan& q) {
      const int64_t ctas = q.blocks * q.chunks;
      return ctas < kWtTargetCtas ? ctas : kWtTargetCtas;
    };
    *plan = wide.chunks <= narrow.chunks && 65 * busy(narrow) < 100 * busy(wide) ? wide : narrow;
    return nullptr;
  }
  return conv_wgrad_tc_plan_width(g, kWtWide, plan);
}

}  // namespace cuda_kernels
}  // namespace rk
