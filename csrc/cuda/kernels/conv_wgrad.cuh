// CUDA kernels of the grouped convolution's weight gradient, as a deterministic two-pass reduction.
// Device code only, torch-free (compiled by nvcc and by the emulator).
//
//   dW[co][ci][kh][kw] = sum over output pixels p of gy[p][co] * x[src(p, kh, kw)][grp(co) * cpg_in + ci]
//
// Pass 1 (weight_grad_partial_kernel): the M = N*OH*OW output pixels are cut into chunks of a fixed size
// (chosen from the shape only). A thread owns one input channel ch (lanes of a warp = 32 consecutive input
// channels, so every input load of a warp is one coalesced 128-byte row segment) and kJ consecutive output
// channels of ch's group, and keeps kJ x TAPS accumulators in registers over the chunk's pixels. Per pixel it
// loads kJ values of gy (the same addresses for the lanes of one group: broadcast loads) and TAPS input values,
// and does kJ * TAPS multiply-adds. It writes its sums to partial[chunk][tap][j][ch].
// Pass 2 (weight_grad_finalize_kernel): one thread per weight element adds the chunks' partials in chunk
// order, in float64, and writes dW in the weight's dtype and layout [C_out][cpg_in][KH][KW].
// No atomics anywhere: the result is bitwise reproducible run to run.
#pragma once

#include <stdint.h>

#include "../../common/conv_geometry.h"
#include "conv_bn_relu_fwd.cuh"

namespace rk {
namespace cuda_kernels {

constexpr int kWgradJ = 4;             // output channels per thread
constexpr int kWgradWarps = 8;         // warps per block (each its own 32 input channels)
constexpr int64_t kWgradChunkMin = 128;  // fewest pixels per chunk

// Pixels per chunk: kWgradChunkMin, or more when the partial sums would exceed `budget` elements.
inline int64_t wgrad_chunk_pixels(int64_t M, int64_t partial_per_chunk, int64_t budget) {
  int64_t chunk = kWgradChunkMin;
  const int64_t max_chunks = budget / (partial_per_chunk > 0 ? partial_per_chunk : 1);
  if (max_chunks >= 1 && (M + chunk - 1) / chunk > max_chunks) chunk = (M + max_chunks - 1) / max_chunks;
  return chunk;
}

// grid: (n_chunks, ceil(C_in / (32 * kWgradWarps)), ceil(cpg_out / kWgradJ)); block: (32, kWgradWarps).
// partial: [n_chunks][TAPS][cpg_out][C_in] in Acc.
template <int TAPS, typename T, typename Acc>
__global__ void __launch_bounds__(32 * kWgradWarps)
    weight_grad_partial_kernel(ConvGeom g, const T* __restrict__ x, const T* __restrict__ gy, int64_t chunk_pixels,
                               Acc* __restrict__ partial) {
  const int64_t ch = (int64_t(blockIdx.y) * kWgradWarps + threadIdx.y) * 32 + threadIdx.x;
  if (ch >= g.C_in) return;  // no barrier in this kernel
  const int64_t cpg_in = g.C_in / g.groups, cpg_out = g.C_out / g.groups;
  const int64_t grp = ch / cpg_in;
  const int64_t j0 = int64_t(blockIdx.z) * kWgradJ;
  const int64_t co0 = grp * cpg_out + j0;
  const int nj = int(cpg_out - j0 < kWgradJ ? cpg_out - j0 : kWgradJ);
  const int64_t M = g.N * g.OH * g.OW;
  const int64_t p0 = int64_t(blockIdx.x) * chunk_pixels;
  const int64_t p1 = p0 + chunk_pixels < M ? p0 + chunk_pixels : M;
  Acc acc[kWgradJ][TAPS];
  for (int j = 0; j < kWgradJ; ++j)
    for (int t = 0; t < TAPS; ++t) acc[j][t] = Acc(0);
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t ow = p % g.OW, oh = (p / g.OW) % g.OH, n = p / (g.OW * g.OH);
    Acc gv[kWgradJ];
    for (int j = 0; j < kWgradJ; ++j) gv[j] = j < nj ? Acc(to_acc(gy[p * g.C_out + co0 + j])) : Acc(0);
    for (int t = 0; t < TAPS; ++t) {
      const int64_t ih = oh * g.stride_h - g.pad_h + int64_t(t / g.KW) * g.dil_h;
      const int64_t iw = ow * g.stride_w - g.pad_w + int64_t(t % g.KW) * g.dil_w;
      if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) continue;
      const Acc xv = Acc(to_acc(x[((n * g.H + ih) * g.W + iw) * g.C_in + ch]));
      for (int j = 0; j < kWgradJ; ++j) acc[j][t] += gv[j] * xv;
    }
  }
  Acc* out = partial + int64_t(blockIdx.x) * TAPS * cpg_out * g.C_in;
  for (int t = 0; t < TAPS; ++t)
    for (int j = 0; j < kWgradJ; ++j)  // compile-time indices: acc stays in registers
      if (j < nj) out[(int64_t(t) * cpg_out + j0 + j) * g.C_in + ch] = acc[j][t];
}

// One thread per weight element w = ((co * cpg_in + ci) * TAPS + t): the sum of its n_chunks partials, in order.
template <typename T, typename Acc>
__global__ void weight_grad_finalize_kernel(ConvGeom g, const Acc* __restrict__ partial, int64_t n_chunks,
                                            T* __restrict__ grad_weight) {
  const int64_t taps = int64_t(g.KH) * g.KW, cpg_in = g.C_in / g.groups, cpg_out = g.C_out / g.groups;
  const int64_t total = g.C_out * cpg_in * taps;
  const int64_t w = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (w >= total) return;
  const int64_t t = w % taps, ci = (w / taps) % cpg_in, co = w / (taps * cpg_in);
  const int64_t ch = (co / cpg_out) * cpg_in + ci, j = co % cpg_out;
  const int64_t idx = (t * cpg_out + j) * g.C_in + ch, per_chunk = taps * cpg_out * g.C_in;
  double sum = 0.0;
  for (int64_t c = 0; c < n_chunks; ++c) sum += double(partial[c * per_chunk + idx]);
  grad_weight[w] = from_acc<T, Acc>(Acc(sum));
}

}  // namespace cuda_kernels
}  // namespace rk
