// Tensor-core weight gradient of the grouped convolution (float16 / bfloat16 in, fp32 accumulation), NHWC x and
// grad_y, deterministic. Device code only, torch-free: compiled by nvcc and, through rk_launch.cuh, by g++ for the
// emulator.
//
//   dW[co][ci][ky][kx] = sum over output pixels p of gy[p][co] * x[src(p, ky, kx)][group(co) * cpg + ci]
//
// Per group an implicit GEMM on mma.sync.m16n8k16: M = output channels, N = (tap, input channel), K = output
// pixels. A CTA (4 warps) owns one 16 x 16 block of (output channel, input channel) for every tap: for groups of
// 16 and less the block on the diagonal, which holds the groups of its 16 channels whole (groups of 4 and 8 use a
// quarter and a half of its products: the products across groups are computed and dropped, which the tensor cores
// can afford and which keeps one kernel for every group size); for groups of 32 and 64, one of the (cpg / 16)^2
// blocks of a group. The grid is (blocks, chunks): the output pixels are cut into a fixed number of chunks of
// sub-tiles, from the shape only.
//   * A sub-tile is up to 256 output pixels (a th x tw rectangle of tn images, tw a multiple of 8). Its 16 grad_y
//     channels (one 32-byte row a pixel) and the input tile with its halo (the block's 16 input channels; at stride 2
//     even and odd columns in separate planes, as in the forward kernel) are copied by 16-byte cp.async, zero-filled
//     outside the images, three sub-tiles in flight. Rows are 32 bytes; the two 16-byte halves of a row swap places
//     in every other group of 4 rows, so the 8 rows of an ldmatrix (8 consecutive pixels) hit all 32 banks.
//   * A k16 step takes 16 pixels: ldmatrix.x4.trans of grad_y gives the A fragment (16 channels x 16 pixels), and per
//     tap one ldmatrix.x4.trans of the input rows under that tap gives the B fragments of both 8-channel halves;
//     18 mma per step for 3x3. The 4 warps take the steps in turn and keep 18 m16n8 fp32 accumulators each.
//   * Epilogue: the warps' accumulators are added in warp order through shared memory, staged in the weight's order
//     and stored coalesced: fp32 partials of the chunk (conv_wgrad_tc_finalize_kernel adds the chunks in chunk order
//     in float64 and rounds once to the weight's dtype), or, with a single chunk, the weight gradient itself.
// No atomics: the sums and their order depend on the shape only, so results are bitwise reproducible run to run.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#include "../../common/conv_geometry.h"
#include "conv_tc.cuh"
#include "ptx.cuh"
#include "rk_launch.cuh"

namespace rk {
namespace cuda_kernels {

constexpr int kWtThreads = 128;
constexpr int kWtWarps = kWtThreads / 32;
constexpr int kWtBlock = 16;                  // output and input channels of a CTA's weight block
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
  int taps, cpg, cw;         // KH * KW; channels per group; input channels per output channel in a block
  int64_t tiles_h, tiles_w, subtiles;  // sub-tiles per image, over the batch
  int64_t blocks, chunks, chunk_subtiles;  // grid.x; grid.y; sub-tiles per chunk
  size_t x_bytes, stage_bytes, table_offset, smem_bytes;
};

// The reason the tensor-core weight gradient does not cover a problem, or nullptr with `plan` filled.
inline const char* conv_wgrad_tc_plan(const ConvGeom& g, bool half, WgradTcPlan* plan) {
  if (const char* why = conv_tc_coverage(g, half)) return why;
  WgradTcPlan p{};
  const int s = g.stride_h;
  p.taps = g.KH * g.KW;
  p.cpg = int(g.C_in / g.groups);
  p.cw = p.cpg < kWtBlock ? p.cpg : kWtBlock;
  p.planes = s == 2 ? 2 : 1;
  int th, tw, tn;
  conv_tc_tile_shape(g, kWtMaxPixels, &th, &tw, &tn);
  // A stage: the input tile's 32-byte rows (a multiple of 128 bytes, where the swizzle repeats), then grad_y's.
  auto plan_stage = [&](int h, int n) {
    p.th = h;
    p.tn = n;
    conv_tc_input_tile(g, h, tw, &p.in_th, &p.in_tw, &p.plane_w);
    p.plane_px = p.in_th * p.plane_w;
    p.img_px = p.planes * p.plane_px;
    p.x_rows = n * p.img_px;
    p.pixels = n * h * tw;
    p.ksteps = (p.pixels + 15) / 16;
    p.x_bytes = (size_t(p.x_rows) * 32 + 127) / 128 * 128;
    p.stage_bytes = p.x_bytes + size_t(p.ksteps) * 16 * 32;
    return p.stage_bytes <= kWtStageBytes;
  };
  if (!conv_tc_fit_tile(&th, &tn, plan_stage)) {
    return "the tensor-core weight gradient's input tile does not fit its shared memory";
  }
  p.tw = tw;
  p.tiles_h = (g.OH + p.th - 1) / p.th;
  p.tiles_w = (g.OW + p.tw - 1) / p.tw;
  p.subtiles = (g.N + p.tn - 1) / p.tn * p.tiles_h * p.tiles_w;
  p.blocks = g.C_out / kWtBlock * (p.cpg <= kWtBlock ? 1 : p.cpg / kWtBlock);  // groups of 32+: (cpg / 16)^2 each
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
  // reuses the stages for the warps' accumulators and the staged block.
  p.table_offset = kWtStages * p.stage_bytes;
  const size_t tables = (size_t(p.x_rows) + 4 * size_t(p.ksteps)) * sizeof(int);
  const size_t epilogue = size_t(kWtWarps) * 2 * p.taps * 32 * sizeof(float4) +
                          (size_t(kWtBlock) * p.cw * p.taps + 32) * sizeof(float);
  p.smem_bytes = p.table_offset + tables > epilogue ? p.table_offset + tables : epilogue;
  if (p.blocks > 2147483647LL) return "more than 2^31 - 1 weight blocks (a grid.x limit)";
  if (p.chunks > 65535) return "more than 65535 chunks (a grid.y limit)";
  *plan = p;
  return nullptr;
}

// Byte offset of 16-byte half `part` of row `row` in a tile of 32-byte rows: the halves swap in every other group
// of 4 rows, so 8 consecutive rows (an ldmatrix) and 4 consecutive whole rows (a cp.async phase) are conflict-free.
__host__ __device__ __forceinline__ int wt_swizzle(int row, int part) {
  return row * 32 + ((part ^ ((row >> 2) & 1)) << 4);
}

// Column skew of output channel `co` (of the block's 16) in the staged block: spreads the lanes of one accumulator
// store over the 32 banks for every block width (cw 16 and 8; cw 4 needs none).
__device__ __forceinline__ int wt_stage_skew(int co, int cw) {
  if (cw == 16) return ((co >> 1) & 1) + 8 * ((co >> 2) & 1) + 16 * (co >> 3);
  return cw == 8 ? co >> 2 : 0;
}


// TAPS = KH * KW (9 or 1). partials: [chunk][C_out][cpg][taps] fp32, or nullptr with grad_weight ([C_out][cpg][taps]
// in T) written directly (a single chunk).
template <typename T, int TAPS>
__global__ void __launch_bounds__(kWtThreads, 4)  // <= 128 registers: 72 accumulators, no spills
    conv_wgrad_tc_kernel(const T* __restrict__ x, const T* __restrict__ gy, ConvGeom g, WgradTcPlan p,
                         float* __restrict__ partials, T* __restrict__ grad_weight) {
  constexpr int NT = 2 * TAPS;  // n8 tiles of a warp: (tap, 8-channel half)
  constexpr int KW = TAPS == 9 ? 3 : 1;
  RK_DYNAMIC_SHARED(unsigned char, smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int s = g.stride_h;

  // The block: its first output channel, the first input channel it reads, its input channels' offset in a group.
  int64_t co0, xc0;
  int ci_off;
  if (p.cpg <= kWtBlock) {
    co0 = xc0 = int64_t(blockIdx.x) * kWtBlock;
    ci_off = 0;
  } else {
    const int nb = p.cpg / kWtBlock;
    const int64_t group = blockIdx.x / (nb * nb);
    const int r = int(blockIdx.x % (nb * nb)), kb = r / nb, cb = r % nb;  // blocks sharing input channels adjacent
    co0 = group * p.cpg + cb * kWtBlock;
    xc0 = group * p.cpg + kb * kWtBlock;
    ci_off = kb * kWtBlock;
  }
  const int64_t st0 = int64_t(blockIdx.y) * p.chunk_subtiles;
  const int nsub = int(p.chunk_subtiles < p.subtiles - st0 ? p.chunk_subtiles : p.subtiles - st0);

  // Tables, the same for every sub-tile: per input-tile row its (image, row, column) or -1 (a slot no input column
  // or tap uses: zero-filled); per octet of 8 output pixels its (image, row, column) or -1, and its input row under
  // tap (0, 0).
  int* xrow_info = reinterpret_cast<int*>(smem + p.table_offset);
  int* oct_info = xrow_info + p.x_rows;
  int* oct_base = oct_info + 2 * p.ksteps;
  for (int r = tid; r < p.x_rows; r += kWtThreads) {
    const int img = r / p.img_px, rest = r - img * p.img_px;
    const int plane = rest / p.plane_px, in_plane = rest - plane * p.plane_px;
    const int ty = in_plane / p.plane_w, col = in_plane - ty * p.plane_w;
    const int tx = p.planes == 2 ? 2 * col + plane : col;
    const bool used = tx < p.in_tw && ty % s < g.KH && tx % s < g.KW;  // 1x1 at stride 2 skips odd rows, columns
    xrow_info[r] = used ? (img << 16) | (ty << 8) | tx : -1;
  }
  const int img_pixels = p.th * p.tw;
  for (int o = tid; o < 2 * p.ksteps; o += kWtThreads) {
    const int px = o * 8;
    if (px < p.pixels) {
      const int img = px / img_pixels, lp = px - img * img_pixels;
      const int ty = lp / p.tw, tx = lp - ty * p.tw;
      oct_info[o] = (img << 16) | (ty << 8) | tx;
      oct_base[o] = img * p.img_px + ty * s * p.plane_w + tx;
    } else {
      oct_info[o] = -1;  // grad_y rows zero-filled; the input rows read are any written ones
      oct_base[o] = 0;
    }
  }
  __syncthreads();

  // Copies sub-tile `st` into stage `buf`: 16-byte cp.async, two per 32-byte row, zero-filled outside the images.
  auto load = [&](int64_t st, int buf) {
    const int64_t tiles = p.tiles_h * p.tiles_w;
    const int64_t n0 = st / tiles * p.tn, tile = st % tiles;
    const int64_t oy0 = tile / p.tiles_w * p.th, ox0 = tile % p.tiles_w * p.tw;
    const int images = p.tn < g.N - n0 ? p.tn : int(g.N - n0);
    unsigned char* xs = smem + size_t(buf) * p.stage_bytes;
    unsigned char* gs = xs + p.x_bytes;
    const int64_t iy0 = oy0 * s - g.pad_h, ix0 = ox0 * s - g.pad_w;
    for (int j = tid; j < 2 * p.x_rows; j += kWtThreads) {
      const int row = j >> 1, part = j & 1;
      const int info = xrow_info[row];
      const int img = info >> 16;
      const int64_t iy = iy0 + ((info >> 8) & 255), ix = ix0 + (info & 255);
      const bool inside = info >= 0 && img < images && iy >= 0 && iy < g.H && ix >= 0 && ix < g.W;
      const T* src = inside ? x + (((n0 + img) * g.H + iy) * g.W + ix) * g.C_in + xc0 + part * 8 : x;
      rk::ptx::cp_async_cg(xs + wt_swizzle(row, part), src, inside ? 16 : 0);
    }
    for (int j = tid; j < p.ksteps * 32; j += kWtThreads) {
      const int k = j >> 1, part = j & 1;
      const int info = oct_info[k >> 3];
      const int img = info >> 16;
      const int64_t oy = oy0 + ((info >> 8) & 255), ox = ox0 + (info & 255) + (k & 7);
      const bool inside = info >= 0 && img < images && oy < g.OH && ox < g.OW;
      const T* src = inside ? gy + (((n0 + img) * g.OH + oy) * g.OW + ox) * g.C_out + co0 + part * 8 : gy;
      rk::ptx::cp_async_cg(gs + wt_swizzle(k, part), src, inside ? 16 : 0);
    }
  };

  float acc[NT][4];
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[t][r] = 0.f;
  // ldmatrix lanes: 8m .. 8m+7 give the rows of matrix m. A (grad_y): matrices (k 0-7 | 8-15) x (channels 0-7 |
  // 8-15), transposed; B (input, per tap): matrices (channels 0-7 | 8-15) x (k 0-7 | 8-15), transposed.
  const int a_row = ((lane >> 4) << 3) + (lane & 7), a_part = (lane >> 3) & 1;
  const int b_kh = (lane >> 3) & 1, b_part = lane >> 4;
  int kx_row[KW];  // input-tile row offset of tap column kx
#pragma unroll
  for (int kx = 0; kx < KW; ++kx) kx_row[kx] = p.planes == 2 ? (kx & 1) * p.plane_px + (kx >> 1) : kx;

  for (int i = 0; i < kWtStages - 1; ++i) {
    if (i < nsub) load(st0 + i, i);
    rk::ptx::cp_async_commit();
  }
  for (int i = 0; i < nsub; ++i) {
    rk::ptx::cp_async_wait<kWtStages - 2>();  // sub-tile i has landed (this thread's copies)
    __syncthreads();  // everyone's copies are visible; everyone is done with the stage the next copy overwrites
    if (i + kWtStages - 1 < nsub) load(st0 + i + kWtStages - 1, (i + kWtStages - 1) % kWtStages);
    rk::ptx::cp_async_commit();
    const unsigned char* xs = smem + size_t(i % kWtStages) * p.stage_bytes;
    const unsigned char* gs = xs + p.x_bytes;
    // The warps take the chunk's k16 steps in turn, continuing across sub-tiles.
    const int first = (warp - (i * p.ksteps) % kWtWarps + kWtWarps) % kWtWarps;
    for (int ks = first; ks < p.ksteps; ks += kWtWarps) {
      uint32_t a[4];
      rk::ptx::ldmatrix<4, true>(a, gs + wt_swizzle(ks * 16 + a_row, a_part));
      const int xrow = oct_base[2 * ks + b_kh] + (lane & 7);
#pragma unroll
      for (int t = 0; t < TAPS; ++t) {
        uint32_t b[4];
        rk::ptx::ldmatrix<4, true>(b, xs + wt_swizzle(xrow + (t / KW) * p.plane_w + kx_row[t % KW], b_part));
        const uint2 b0 = make_uint2(b[0], b[1]), b1 = make_uint2(b[2], b[3]);
        tc_mma<T>(acc[2 * t], a, b0);
        tc_mma<T>(acc[2 * t + 1], a, b1);
      }
    }
  }
  rk::ptx::cp_async_wait<0>();  // only empty groups remain; no copy may land after the stages are reused
  __syncthreads();

  // Epilogue. Each warp's accumulators go to shared memory as [warp][tile][lane] float4 (conflict-free); warp w then
  // adds tile t = w, w + 4, ... over the 4 warps in warp order and stages the block's useful entries in the weight's
  // order [co][ci][tap] (row co skewed by wt_stage_skew); the staged block is stored coalesced.
  float4* dump = reinterpret_cast<float4*>(smem);
#pragma unroll
  for (int t = 0; t < NT; ++t) dump[(warp * NT + t) * 32 + lane] = make_float4(acc[t][0], acc[t][1], acc[t][2], acc[t][3]);
  __syncthreads();
  float* stage = reinterpret_cast<float*>(smem + size_t(kWtWarps) * NT * 32 * sizeof(float4));
  const int row_len = p.cw * TAPS;  // staged entries per output channel
  const int gq = lane >> 2, t4 = lane & 3;
  for (int t = warp; t < NT; t += kWtWarps) {
    float4 v = dump[t * 32 + lane];
    for (int w = 1; w < kWtWarps; ++w) {
      const float4 u = dump[(w * NT + t) * 32 + lane];
      v = make_float4(v.x + u.x, v.y + u.y, v.z + u.z, v.w + u.w);
    }
    const float vals[4] = {v.x, v.y, v.z, v.w};
    const int tap = t >> 1;
#pragma unroll
    for (int r = 0; r < 4; ++r) {  // c[r] at row (output channel) g + 8 (r / 2), column 2 t4 + r % 2 of the half
      const int co = gq + 8 * (r >> 1), ci = 8 * (t & 1) + 2 * t4 + (r & 1);
      if (p.cw < kWtBlock && co / p.cw != ci / p.cw) continue;  // another group's product
      const int cg = p.cw < kWtBlock ? ci % p.cw : ci;
      stage[co * row_len + wt_stage_skew(co, p.cw) + cg * TAPS + tap] = vals[r];
    }
  }
  __syncthreads();
  const int64_t w_row = int64_t(p.cpg) * TAPS;  // weight entries per output channel
  float* out = partials ? partials + int64_t(blockIdx.y) * g.C_out * w_row : nullptr;
  for (int e = tid; e < kWtBlock * row_len; e += kWtThreads) {
    const int co = e / row_len, rest = e - co * row_len;
    const float v = stage[co * row_len + wt_stage_skew(co, p.cw) + rest];
    const int64_t idx = (co0 + co) * w_row + int64_t(ci_off) * TAPS + rest;
    if (out) {
      out[idx] = v;
    } else {
      grad_weight[idx] = tc_from_float<T>(v);
    }
  }
}

// grad_weight (numel entries, numel % 4 == 0) = the sum of the chunks' partials in chunk order, in float64, rounded
// once to T; 4 entries (16-byte loads) per thread.
template <typename T>
__global__ void conv_wgrad_tc_finalize_kernel(const float* __restrict__ partials, int64_t numel, int64_t chunks,
                                              T* __restrict__ grad_weight) {
  const int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
  if (i >= numel) return;
  double sum[4] = {0.0, 0.0, 0.0, 0.0};
  for (int64_t c = 0; c < chunks; ++c) {
    const float4 v = *reinterpret_cast<const float4*>(partials + c * numel + i);
    sum[0] += double(v.x);
    sum[1] += double(v.y);
    sum[2] += double(v.z);
    sum[3] += double(v.w);
  }
  uint32_t packed[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {  // rounded once, from float64 (no detour through float32)
    uint16_t lo, hi;
    if constexpr (std::is_same_v<T, __half>) {
      lo = bits16(__double2half(sum[2 * h]));
      hi = bits16(__double2half(sum[2 * h + 1]));
    } else {
      lo = bits16(__double2bfloat16(sum[2 * h]));
      hi = bits16(__double2bfloat16(sum[2 * h + 1]));
    }
    packed[h] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
  *reinterpret_cast<uint2*>(grad_weight + i) = make_uint2(packed[0], packed[1]);
}

}  // namespace cuda_kernels
}  // namespace rk
