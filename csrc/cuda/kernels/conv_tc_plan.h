// Launch plan of the tensor-core kernels (conv_tc.cuh): their tiling constants and the coverage rule, and the plan of
// the data gradient they compute at stride 1. Plain C++ (no CUDA or torch headers): the host launchers and the CPU
// build's planner op (csrc/cpu/plan_ops.cpp, which explain() asks) run the same rule.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "../../common/conv_geometry.h"

namespace rk {
namespace cuda_kernels {

constexpr int kTcChannels = 64;       // output channels of a CTA (and the input channels it reads)
constexpr int kTcMaxPixels = 128;     // output pixels of a CTA: 8 m16 tiles

// A CTA's warps: WM along pixels, each with MI m16 tiles (m16 tile i of warp w: w + WM i), x 64 / (8 NT) along
// channels, each with NT n8 tiles; WM * MI = 8. Up to 128 registers a thread for 16 accumulator tiles, 255 for 32.
template <int WM, int MI, int NT>
struct TcWarpTile {
  static_assert(WM * MI * 16 == kTcMaxPixels && NT * 8 <= kTcChannels, "a CTA's 128 pixels x 64 channels");
  static constexpr int kThreads = WM * (kTcChannels / (8 * NT)) * 32;
  static constexpr int kMinBlocks = 65536 / (kThreads * (MI * NT <= 16 ? 128 : 256));
};
// Bytes of shared memory per tile pixel: its 64 channels + 16 bytes that shift consecutive pixels by 4 banks.
constexpr int tc_pitch(int elem_bytes) { return 64 * elem_bytes + 16; }
// Bytes per pixel of the epilogue's staging tile: a lane (g, t) stores channels 2t, 2t+1 of pixel g (+8), as one
// word (16-bit) or 8 bytes (float32: half-warp phases): conflict-free when pixels are 36 (or 72) words apart.
constexpr int tc_stage_pitch(int elem_bytes) { return elem_bytes == 2 ? 144 : 288; }
constexpr size_t kTcMaxSmem = 64 * 1024;  // over 48 KiB the launcher raises the kernel's limit (sm_80+: 163 KiB)

struct TcPlan {
  int warps_m, m16, n8;  // the warp tiling: TcWarpTile<warps_m, m16, n8>
  int threads;
  int th, tw;            // output tile of one image
  int tn;                // images per CTA (small images: a whole image is one tile); tn * th * tw <= 128
  int in_th, in_tw;      // input tile of one image, with its halo
  int planes, plane_w;   // 2 column planes at stride 2, else 1; shared-memory pixels per plane row
  int img_px;            // shared-memory pixels per image
  int kw;                // input channels of an n8 tile's window: 8 (groups of 4, 8) or the group size
  int ksteps;            // k16 steps of an n8 tile
  int chunk_steps;       // k16 steps whose B fragments are staged in shared memory together (one tap's)
  int taps;              // KH * KW: 9 or 1
  int elem_bytes;        // 2 (float16/bfloat16) or 4 (float32 as TF32)
  int pitch;             // tc_pitch(elem_bytes)
  int64_t tiles_h, tiles_w, grid_x, grid_y;
  int smem_pixels;       // tn images' input tiles + the zero pixel
  size_t b_offset;       // where the two B chunk buffers start in shared memory
  size_t smem_bytes;
};

// The reason the tensor-core kernels' geometry (forward, data and weight gradients) does not cover a problem, or
// nullptr. The dtype is each kernel's own rule.
inline const char* conv_tc_geometry_coverage(const ConvGeom& g) {
  if (!((g.KH == 3 && g.KW == 3) || (g.KH == 1 && g.KW == 1))) return "the tensor-core kernels take 3x3 and 1x1";
  if (g.dil_h != 1 || g.dil_w != 1) return "the tensor-core kernels take dilation 1";
  if (g.stride_h != g.stride_w || g.stride_h > 2) return "the tensor-core kernels take stride 1 or 2 (equal)";
  const int64_t cpg = g.C_in / g.groups;
  if (g.C_in != g.C_out) return "the tensor-core kernels take as many output channels as input channels";
  if (g.C_out % kTcChannels != 0) return "the tensor-core kernels take channel counts that are multiples of 64";
  if (cpg != 4 && cpg != 8 && cpg != 16 && cpg != 32 && cpg != 64) {
    return "the tensor-core kernels take groups of 4, 8, 16, 32 or 64 channels";
  }
  return nullptr;
}

// Tile width: a multiple of 8, so the 8 rows of every ldmatrix (8 consecutive tile pixels) lie in one tile row of
// one image, at consecutive shared-memory rows. The whole row up to 32 pixels (columns past the image are computed
// and dropped), else 16 or 8, whichever leaves fewer such columns.
inline int conv_tc_tile_width(int64_t OW) {
  if (OW <= 32) return int((OW + 7) / 8 * 8);
  const int64_t waste16 = (OW + 15) / 16 * 16 - OW, waste8 = (OW + 7) / 8 * 8 - OW;
  return waste16 <= waste8 ? 16 : 8;
}

// Output tile of up to max_pixels: conv_tc_tile_width columns, as many rows as fit, evened out over the image; small
// images: several per tile, so that a CTA's weights (or accumulators) serve up to max_pixels pixels.
inline void conv_tc_tile_shape(const ConvGeom& g, int max_pixels, int* th, int* tw, int* tn) {
  *tw = conv_tc_tile_width(g.OW);
  int h = max_pixels / *tw;
  if (h > g.OH) h = int(g.OH);
  const int64_t bands = (g.OH + h - 1) / h;
  *th = int((g.OH + bands - 1) / bands);
  int n = *th == g.OH && *tw >= g.OW ? max_pixels / (*th * *tw) : 1;
  if (n > g.N) n = int(g.N);
  *tn = n < 1 ? 1 : n;
}

// The input tile under th x tw output pixels, with its halo: rows, columns, and pixels per row of a column plane (at
// stride 2 even and odd input columns go to separate planes, so consecutive output pixels read consecutive rows).
inline void conv_tc_input_tile(const ConvGeom& g, int th, int tw, int* in_th, int* in_tw, int* plane_w) {
  *in_th = (th - 1) * g.stride_h + g.KH;
  *in_tw = (tw - 1) * g.stride_w + g.KW;
  *plane_w = g.stride_w == 2 ? (*in_tw + 1) / 2 : *in_tw;
}

// Shrinks a tile (fewer images, then fewer rows) until fits(th, tn) holds; false when one row of one image does not.
template <typename Fits>
inline bool conv_tc_fit_tile(int* th, int* tn, const Fits& fits) {
  while (!fits(*th, *tn)) {
    if (*tn > 1) {
      --*tn;
    } else if (*th > 1) {
      --*th;
    } else {
      return false;
    }
  }
  return true;
}

// The reason the tensor-core kernels do not cover a problem, or nullptr with `plan` filled. elem_bytes: 2 for
// float16/bfloat16, 4 for float32 with TF32 allowed, 0 otherwise (float32 without TF32 and float64 run the
// CUDA-core kernel).
inline const char* conv_tc_plan(const ConvGeom& g, int elem_bytes, TcPlan* plan) {
  if (elem_bytes != 2 && elem_bytes != 4) {
    return "the tensor-core kernels take float16, bfloat16, and float32 where TF32 is allowed "
           "(torch.backends.cudnn.allow_tf32)";
  }
  if (const char* why = conv_tc_geometry_coverage(g)) return why;
  const int64_t cpg = g.C_in / g.groups;
  TcPlan p{};
  // Warp tiles of 32 accumulator tiles where an A fragment serves enough n8 tiles: per mma, shared memory serves
  // 4 wavefronts of A / the n8 tiles of its window + 2 of B / the warp's m16 tiles. Windows of 64: 4 m16 x 8 n8
  // (0.5 + 0.5); of 16 and 32: 8 m16 x 4 n8 (1 + 0.25, or 2 + 0.25); of 8: 4 m16 x 4 n8 (4 + 0.5: A-bound either
  // way, and half the registers).
  p.m16 = cpg == 16 || cpg == 32 ? 8 : 4;
  p.n8 = cpg == 64 ? 8 : 4;
  p.warps_m = 8 / p.m16;
  p.threads = p.warps_m * (kTcChannels / (8 * p.n8)) * 32;
  p.taps = g.KH * g.KW;
  p.elem_bytes = elem_bytes;
  p.pitch = tc_pitch(elem_bytes);
  p.kw = cpg <= 8 ? 8 : int(cpg);
  // k steps of one tap (16-bit: windows of 8 take two taps a k16 step, the tenth tap a zero pixel)
  p.chunk_steps = elem_bytes == 4 ? p.kw / 8 : (p.kw == 8 ? 1 : p.kw / 16);
  p.ksteps = elem_bytes == 2 && p.kw == 8 ? (p.taps + 1) / 2 : p.taps * p.chunk_steps;
  p.planes = g.stride_h == 2 ? 2 : 1;
  // Consecutive shared-memory rows are 4 banks apart: the 8 rows of an ldmatrix are conflict-free. Fewer rows or
  // images below until the tiles fit the shared memory.
  int th, tw, tn;
  conv_tc_tile_shape(g, kTcMaxPixels, &th, &tw, &tn);
  const size_t b_bytes = 2 * size_t(p.chunk_steps) * 8 * 32 * 8;  // double-buffered B chunk (uint2 fragments)
  const bool fits = conv_tc_fit_tile(&th, &tn, [&](int h, int n) {
    p.th = h;
    p.tw = tw;
    p.tn = n;
    conv_tc_input_tile(g, h, tw, &p.in_th, &p.in_tw, &p.plane_w);
    p.img_px = p.planes * p.in_th * p.plane_w;
    p.smem_pixels = n * p.img_px + 1;
    p.b_offset = size_t(p.smem_pixels) * p.pitch;
    const size_t staging = size_t(n) * h * tw * tc_stage_pitch(elem_bytes);
    const size_t used = p.b_offset + b_bytes;
    p.smem_bytes = (used > staging ? used : staging) + 2 * size_t(p.threads) * 4;  // + the statistics' reduction
    return p.smem_bytes <= kTcMaxSmem;
  });
  if (!fits) return "the tensor-core kernel's input tile does not fit 64 KiB of shared memory";
  p.tiles_h = (g.OH + p.th - 1) / p.th;
  p.tiles_w = (g.OW + p.tw - 1) / p.tw;
  p.grid_x = (g.N + p.tn - 1) / p.tn * p.tiles_h * p.tiles_w;
  p.grid_y = g.C_out / kTcChannels;
  if (p.grid_x > 2147483647LL) return "more than 2^31 - 1 output tiles (a grid.x limit)";
  if (p.grid_y > 65535) return "more than 65535 blocks of 64 channels (a grid.y limit)";
  *plan = p;
  return nullptr;
}

// The data gradient of a stride-1 convolution as a forward convolution on grad_y (each group's kernel transposed and
// flipped, padding KH - 1 - pad): its geometry in `gd` and plan in `plan`, or the reason the kernels do not take it.
inline const char* conv_tc_data_grad_plan(const ConvGeom& g, int elem_bytes, ConvGeom* gd, TcPlan* plan) {
  if (g.stride_h != 1 || g.stride_w != 1) return "the tensor-core data gradient takes stride 1";
  if (g.pad_h > g.KH - 1 || g.pad_w > g.KW - 1) return "the tensor-core data gradient takes padding < kernel size";
  ConvGeom d = g;
  d.H = g.OH;
  d.W = g.OW;
  d.C_in = g.C_out;
  d.OH = g.H;
  d.OW = g.W;
  d.C_out = g.C_in;
  d.pad_h = g.KH - 1 - g.pad_h;
  d.pad_w = g.KW - 1 - g.pad_w;
  if (conv_out_size(d.H, d.KH, 1, d.pad_h, 1) != d.OH || conv_out_size(d.W, d.KW, 1, d.pad_w, 1) != d.OW) {
    return "the transposed convolution's size differs from the input's";
  }
  if (const char* why = conv_tc_plan(d, elem_bytes, plan)) return why;
  *gd = d;
  return nullptr;
}

// The element bytes the tensor-core kernels take a dtype in: 2 (float16, bfloat16), 4 (float32 as TF32, where PyTorch
// allows TF32 for convolutions, as cuDNN would use it), 0 (none: float32 without TF32, float64).
inline int conv_tc_elem_bytes(bool half16, bool float32, bool allow_tf32) {
  return half16 ? 2 : (float32 && allow_tf32 ? 4 : 0);
}

}  // namespace cuda_kernels
}  // namespace rk
