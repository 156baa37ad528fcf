// Tensor-core weight gradient of the grouped convolution (float16 / bfloat16 in, fp32 accumulation), NHWC x and
// grad_y, deterministic. Device code only, torch-free: compiled by nvcc and, through rk_launch.cuh, by g++ for the
// emulator.
//
//   dW[co][ci][ky][kx] = sum over output pixels p of gy[p][co] * x[src(p, ky, kx)][group(co) * cpg + ci]
//
// Per group an implicit GEMM on mma.sync.m16n8k16: M = output channels, N = (tap, input channel), K = output
// pixels. A CTA (4 warps) owns one block of (output channel, input channel) for every tap, bw x bw channels:
//   * narrow: bw = 16. For groups of 4 to 16 the block on the diagonal, which holds the groups of its 16 channels
//     whole (groups of 4 and 8 use a quarter and a half of its products: the products across groups are computed and
//     dropped, which the tensor cores can afford and which keeps one kernel for these group sizes); for groups of 32
//     and 64 one of the (cpg / 16)^2 blocks of a group. Each warp keeps the whole block (1 m16 tile x 2 n8 halves
//     per tap) and the 4 warps take the k16 steps in turn: 10 ldmatrix.x4 for 18 mma a step (3x3), as an input
//     fragment serves only its group's 16 output channels;
//   * wide, for groups of 32 and 64 where there are CTAs enough (conv_wgrad_tc_plan): bw = 32, the group or one of
//     its 2 x 2 blocks. Warp w keeps input channels 8w .. 8w+7 of the block for all 32 output channels (2 m16 tiles x
//     1 n8 per tap) and runs every k16 step: 2 + 4.5 ldmatrix.x4 for 18 mma a step.
// Either way 18 m16n8 fp32 accumulators a thread (3x3). The grid is (blocks, chunks): the output pixels are cut into
// chunks of sub-tiles, their number from the shape only.
//   * A sub-tile is up to 256 output pixels (a th x tw rectangle of tn images, tw a multiple of 8). Its bw grad_y
//     channels (one 2 bw-byte row a pixel) and the input tile with its halo (the block's bw input channels; at stride
//     2 even and odd columns in separate planes, as in the forward kernel) are copied by 16-byte cp.async,
//     zero-filled outside the images, three sub-tiles in flight. The 16-byte parts of a row are XOR-swizzled by the
//     row, so the 8 rows of an ldmatrix (8 consecutive pixels) and every cp.async phase hit all 32 banks.
//   * A k16 step takes 16 pixels: ldmatrix.x4.trans of grad_y gives an A fragment (16 channels x 16 pixels), and
//     ldmatrix.x4.trans of the input rows under a tap the B fragments of two n8 tiles (narrow: the two 8-channel
//     halves of one tap; wide: one octet under two taps).
//   * Epilogue: narrow, the warps' accumulators are added in warp order through shared memory; the block is staged
//     in the weight's order and stored coalesced: fp32 partials of the chunk (conv_wgrad_tc_finalize_kernel adds the
//     chunks in chunk order in float64 and rounds once to the weight's dtype), or, with a single chunk, the weight
//     gradient itself.
// No atomics: the sums and their order depend on the shape only, so results are bitwise reproducible run to run.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#include "../../common/conv_geometry.h"
#include "conv_tc.cuh"
#include "conv_wgrad_tc_plan.h"
#include "ptx.cuh"
#include "rk_launch.cuh"

namespace rk {
namespace cuda_kernels {

// Byte offset of 16-byte part `part` of row `row` in a tile of PARTS-part rows (PARTS 2 or 4): a 128-byte line holds
// 8 / PARTS rows, and the parts are XORed with the line's index modulo PARTS, so 8 consecutive rows (an ldmatrix)
// and 8 consecutive parts (a cp.async phase) fall on 8 distinct 16-byte positions: conflict-free.
template <int PARTS>
__host__ __device__ __forceinline__ int wt_swizzle(int row, int part) {
  return row * 16 * PARTS + ((part ^ ((row >> (PARTS == 2 ? 2 : 1)) & (PARTS - 1))) << 4);
}

// Skew of output channel `co`'s row in the staged block of cw input channels: the lanes of one accumulator store
// (channels g = lane / 4 of 8, input channels 2 (lane % 4)) hit the 32 banks once each; rows of taps x cw floats.
__device__ __forceinline__ int wt_stage_skew(int co, int cw) {
  if (cw >= 16) {  // rows of 16 (mod 32) or 0 floats: skews 0, 1, 8, 9, 16, 17, 24, 25 for g = 0 .. 7
    return cw == 16 ? ((co >> 1) & 1) + 8 * ((co >> 2) & 1) + 16 * (co >> 3)
                    : (co & 1) + 8 * ((co >> 1) & 1) + 16 * ((co >> 2) & 1) + 32 * (co >> 3);
  }
  return cw == 8 ? co >> 2 : 0;
}


// TAPS = KH * KW (9 or 1); WIDE: blocks of 32 (p.bw == 32). partials: [chunk][C_out][cpg][taps] fp32, or nullptr
// with grad_weight ([C_out][cpg][taps] in T) written directly (a single chunk).
template <typename T, int TAPS, bool WIDE>
__global__ void __launch_bounds__(kWtThreads, 4)  // <= 128 registers: 72 accumulators, no spills
    conv_wgrad_tc_kernel(const T* __restrict__ x, const T* __restrict__ gy, ConvGeom g, WgradTcPlan p,
                         float* __restrict__ partials, T* __restrict__ grad_weight) {
  constexpr int NT = 2 * TAPS;  // m16n8 tiles of a warp: narrow (tap, 8-channel half), wide (m16 tile, tap)
  constexpr int KW = TAPS == 9 ? 3 : 1;
  constexpr int BW = WIDE ? kWtWide : kWtNarrow;
  constexpr int PARTS = BW / 8;  // 16-byte parts of a shared-memory row
  RK_DYNAMIC_SHARED(unsigned char, smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int s = g.stride_h;

  // The block: its first output channel, the first input channel it reads, its input channels' offset in a group.
  int64_t co0, xc0;
  int ci_off;
  if (p.cpg <= BW) {
    co0 = xc0 = int64_t(blockIdx.x) * BW;
    ci_off = 0;
  } else {
    const int nb = p.cpg / BW;
    const int64_t group = blockIdx.x / (nb * nb);
    const int r = int(blockIdx.x % (nb * nb)), kb = r / nb, cb = r % nb;  // blocks sharing input channels adjacent
    co0 = group * p.cpg + cb * BW;
    xc0 = group * p.cpg + kb * BW;
    ci_off = kb * BW;
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

  // Copies sub-tile `st` into stage `buf`: 16-byte cp.async, PARTS per row, zero-filled outside the images.
  auto load = [&](int64_t st, int buf) {
    const int64_t tiles = p.tiles_h * p.tiles_w;
    const int64_t n0 = st / tiles * p.tn, tile = st % tiles;
    const int64_t oy0 = tile / p.tiles_w * p.th, ox0 = tile % p.tiles_w * p.tw;
    const int images = p.tn < g.N - n0 ? p.tn : int(g.N - n0);
    unsigned char* xs = smem + size_t(buf) * p.stage_bytes;
    unsigned char* gs = xs + p.x_bytes;
    const int64_t iy0 = oy0 * s - g.pad_h, ix0 = ox0 * s - g.pad_w;
    for (int j = tid; j < PARTS * p.x_rows; j += kWtThreads) {
      const int row = j / PARTS, part = j % PARTS;
      const int info = xrow_info[row];
      const int img = info >> 16;
      const int64_t iy = iy0 + ((info >> 8) & 255), ix = ix0 + (info & 255);
      const bool inside = info >= 0 && img < images && iy >= 0 && iy < g.H && ix >= 0 && ix < g.W;
      const T* src = inside ? x + (((n0 + img) * g.H + iy) * g.W + ix) * g.C_in + xc0 + part * 8 : x;
      rk::ptx::cp_async_cg(xs + wt_swizzle<PARTS>(row, part), src, inside ? 16 : 0);
    }
    for (int j = tid; j < p.ksteps * 16 * PARTS; j += kWtThreads) {
      const int k = j / PARTS, part = j % PARTS;
      const int info = oct_info[k >> 3];
      const int img = info >> 16;
      const int64_t oy = oy0 + ((info >> 8) & 255), ox = ox0 + (info & 255) + (k & 7);
      const bool inside = info >= 0 && img < images && oy < g.OH && ox < g.OW;
      const T* src = inside ? gy + (((n0 + img) * g.OH + oy) * g.OW + ox) * g.C_out + co0 + part * 8 : gy;
      rk::ptx::cp_async_cg(gs + wt_swizzle<PARTS>(k, part), src, inside ? 16 : 0);
    }
  };

  float acc[NT][4];
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[t][r] = 0.f;
  // ldmatrix lanes: 8m .. 8m+7 give the rows of matrix m. A (grad_y): matrices (k 0-7 | 8-15) x (channels 0-7 |
  // 8-15), transposed. B (input): matrices (k 0-7, 8-15) of n8 tile 0, then of n8 tile 1, transposed; narrow: the
  // channel halves of one tap, wide: the warp's octet under taps 2q and 2q + 1.
  const int a_row = ((lane >> 4) << 3) + (lane & 7), a_part = (lane >> 3) & 1;
  const int b_kh = (lane >> 3) & 1, b_hi = lane >> 4;
  auto tap_row = [&](int t) {  // input-tile row offset of tap t
    const int kx = t % KW;
    return (t / KW) * p.plane_w + (p.planes == 2 ? (kx & 1) * p.plane_px + (kx >> 1) : kx);
  };
  int b_off[WIDE ? (TAPS + 1) / 2 : TAPS];  // narrow: tap t; wide: tap 2q + b_hi (the last pair: the last tap twice)
#pragma unroll
  for (int q = 0; q < (WIDE ? (TAPS + 1) / 2 : TAPS); ++q) {
    b_off[q] = WIDE ? tap_row(2 * q + b_hi < TAPS ? 2 * q + b_hi : TAPS - 1) : tap_row(q);
  }

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
    if constexpr (!WIDE) {
      // The warps take the chunk's k16 steps in turn, continuing across sub-tiles.
      const int first = (warp - (i * p.ksteps) % kWtWarps + kWtWarps) % kWtWarps;
      for (int ks = first; ks < p.ksteps; ks += kWtWarps) {
        uint32_t a[4];
        rk::ptx::ldmatrix<4, true>(a, gs + wt_swizzle<PARTS>(ks * 16 + a_row, a_part));
        const int xrow = oct_base[2 * ks + b_kh] + (lane & 7);
#pragma unroll
        for (int t = 0; t < TAPS; ++t) {
          uint32_t b[4];
          rk::ptx::ldmatrix<4, true>(b, xs + wt_swizzle<PARTS>(xrow + b_off[t], b_hi));
          tc_mma<T>(acc[2 * t], a, make_uint2(b[0], b[1]));
          tc_mma<T>(acc[2 * t + 1], a, make_uint2(b[2], b[3]));
        }
      }
    } else {
      // Every warp runs every k16 step, for its octet of input channels.
      for (int ks = 0; ks < p.ksteps; ++ks) {
        uint32_t a[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          rk::ptx::ldmatrix<4, true>(a[mt], gs + wt_swizzle<PARTS>(ks * 16 + a_row, 2 * mt + a_part));
        }
        const int xrow = oct_base[2 * ks + b_kh] + (lane & 7);
#pragma unroll
        for (int q = 0; q < TAPS / 2; ++q) {
          uint32_t b[4];
          rk::ptx::ldmatrix<4, true>(b, xs + wt_swizzle<PARTS>(xrow + b_off[q], warp));
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            tc_mma<T>(acc[mt * TAPS + 2 * q], a[mt], make_uint2(b[0], b[1]));
            tc_mma<T>(acc[mt * TAPS + 2 * q + 1], a[mt], make_uint2(b[2], b[3]));
          }
        }
        if constexpr (TAPS % 2 == 1) {
          uint32_t b[2];
          rk::ptx::ldmatrix<2, true>(b, xs + wt_swizzle<PARTS>(xrow + b_off[TAPS / 2], warp));
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) tc_mma<T>(acc[mt * TAPS + TAPS - 1], a[mt], make_uint2(b[0], b[1]));
        }
      }
    }
  }
  rk::ptx::cp_async_wait<0>();  // only empty groups remain; no copy may land after the stages are reused
  __syncthreads();

  // Epilogue: the block's useful entries staged in the weight's order [co][ci][tap] (row co skewed by wt_stage_skew),
  // then stored coalesced. c[r] of a tile is at row (output channel) g + 8 (r / 2), column 2 t4 + r % 2.
  const int row_len = p.cw * TAPS;  // staged entries per output channel
  const int gq = lane >> 2, t4 = lane & 3;
  float* stage;
  if constexpr (!WIDE) {
    // The warps' accumulators go to shared memory as [warp][tile][lane] float4 (conflict-free); warp w adds tile
    // t = w, w + 4, ... over the 4 warps in warp order and stages it.
    float4* dump = reinterpret_cast<float4*>(smem);
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      dump[(warp * NT + t) * 32 + lane] = make_float4(acc[t][0], acc[t][1], acc[t][2], acc[t][3]);
    }
    __syncthreads();
    stage = reinterpret_cast<float*>(smem + size_t(kWtWarps) * NT * 32 * sizeof(float4));
    for (int t = warp; t < NT; t += kWtWarps) {
      float4 v = dump[t * 32 + lane];
      for (int w = 1; w < kWtWarps; ++w) {
        const float4 u = dump[(w * NT + t) * 32 + lane];
        v = make_float4(v.x + u.x, v.y + u.y, v.z + u.z, v.w + u.w);
      }
      const float vals[4] = {v.x, v.y, v.z, v.w};
      const int tap = t >> 1;
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int co = gq + 8 * (r >> 1), ci = 8 * (t & 1) + 2 * t4 + (r & 1);
        if (p.cw < BW && co / p.cw != ci / p.cw) continue;  // another group's product
        const int cg = p.cw < BW ? ci % p.cw : ci;
        stage[co * row_len + wt_stage_skew(co, p.cw) + cg * TAPS + tap] = vals[r];
      }
    }
  } else {
    stage = reinterpret_cast<float*>(smem);  // each warp stages its own octet's entries
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const int mt = t / TAPS, tap = t % TAPS;
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int co = 16 * mt + gq + 8 * (r >> 1), ci = 8 * warp + 2 * t4 + (r & 1);
        stage[co * row_len + wt_stage_skew(co, BW) + ci * TAPS + tap] = acc[t][r];
      }
    }
  }
  __syncthreads();
  const int64_t w_row = int64_t(p.cpg) * TAPS;  // weight entries per output channel
  float* out = partials ? partials + int64_t(blockIdx.y) * g.C_out * w_row : nullptr;
  for (int e = tid; e < BW * row_len; e += kWtThreads) {
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
