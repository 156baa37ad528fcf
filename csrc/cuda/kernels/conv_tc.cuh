// Tensor-core kernels of the fused grouped convolution (float16 / bfloat16 on m16n8k16, float32 as TF32 on m16n8k8;
// fp32 accumulation), NHWC.
// Device code only, torch-free: compiled by nvcc and, through rk_launch.cuh, by g++ for the emulator.
//
// Implicit GEMM on mma.sync: M = output pixels, N = output channels, K = (tap, input channel) of the output
// channel's group. Below, k16 steps are those of 16-bit types; float32 takes k8 steps (TF32, the same 16 bytes of a
// pixel's channels per ldmatrix half-row: 4 channels instead of 8; operands rounded by cvt.rna.tf32). A CTA (2 or 4
// warps) computes a tile of up to 128 output pixels (th x tw of tn images) for 64 output channels, which read the
// same 64 input channels (groups of 4 to 64 channels, C_in == C_out).
//   * The input tile with its halo is copied once into shared memory by 16-byte cp.async (zero-filled outside the
//     image), one pixel's 64 channels per row of 64 elements + 16 bytes: the spare bytes shift consecutive pixels
//     by 4 banks, so the 8 rows of an ldmatrix (8 consecutive pixels: tiles are a multiple of 8 wide) hit distinct
//     banks. At stride 2 even and odd input columns go to separate planes, so consecutive output pixels read
//     consecutive rows there too.
//   * Each n8 tile of output channels reads a window of input channels: its own 8 channels for groups of 4 or 8
//     (two groups of 4 share an n8 tile: the weight is block-diagonal, half zeros), its group's channels from 16
//     on. A k16 step is two taps x 8 channels (window 8: 9 taps in 5 steps, the 10th tap a zero pixel) or one tap
//     x 16 channels. ldmatrix.x4 loads a 16-pixel x k16 A fragment straight from the tile rows; the n8 tiles of
//     one window reuse it. B fragments, packed once in fragment order, are staged one tap at a time in two
//     shared-memory buffers by cp.async, the next tap's copy in flight while the current one is multiplied.
//   * Warps (TcWarpTile): WM along pixels (m16 tiles alternate) x 64 / (8 NT) along channels, MI m16 x NT n8 tiles
//     of fp32 accumulators each: 2 x 2 warps of 4 x 4 (windows of 8), 1 x 2 of 8 x 4 (16, 32), 2 x 1 of 4 x 8 (64).
//     An A fragment (ldmatrix.x4: 4 wavefronts) serves the n8 tiles of its window, a B fragment (2 wavefronts) the
//     warp's m16 tiles. An SM's shared memory serves a wavefront a cycle, its tensor cores about an mma: the
//     larger warp tiles bring windows of 32 and 64 from 1.5 wavefronts an mma to 1.25 and 1.0 (conv_tc_plan).
//   * Epilogue: BN scale/shift and ReLU in fp32 (inference), or the raw convolution (training), rounded to T and
//     staged through shared memory, then stored by 16-byte coalesced writes: every output byte written once.
//     In training the CTA also reduces its tile's per-channel sum and squared deviations from the tile mean (of
//     the rounded values), one partial per (tile, channel); conv_tc_stats_finalize_kernel merges them in tile
//     order (Chan's formula, float64): deterministic, no atomics.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#include "../../common/conv_geometry.h"
#include "bn_train.cuh"
#include "conv_tc_plan.h"
#include "ptx.cuh"
#include "rk_launch.cuh"

namespace rk {
namespace cuda_kernels {

template <typename T>
__host__ __device__ inline uint16_t bits16(T v) {
  static_assert(sizeof(T) == 2, "16-bit type");
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, __half>) {
    return __half_as_ushort(v);
  } else {
    return __bfloat16_as_ushort(v);
  }
#else
  uint16_t u;
  memcpy(&u, &v, sizeof(u));
  return u;
#endif
}

// Packs the weight, given OHWI ([C_out][KH][KW][cpg], contiguous), into B fragments: out[((cb * ksteps + s) * 8 + j)
// * 32 + lane] holds, for n8 tile j of channel block cb at k step s, the lane's two registers (column g = lane / 4,
// t = lane % 4): 16-bit, k 2t, 2t+1 | 2t+8, 2t+9 (a k-pair is 4 adjacent bytes, never straddling groups: they
// start at multiples of 4); float32, k t | t+4 rounded to TF32. One thread per uint2; zeros where a k is no tap or
// another group's channel.
template <typename T>
__global__ void conv_tc_pack_weight_kernel(const T* __restrict__ w, ConvGeom g, TcPlan p, uint2* __restrict__ out) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t total = (g.C_out / kTcChannels) * int64_t(p.ksteps) * 8 * 32;
  if (idx >= total) return;
  const int lane = int(idx % 32), j = int((idx / 32) % 8), s = int((idx / 256) % p.ksteps);
  const int64_t cb = idx / (256 * int64_t(p.ksteps));
  const int64_t cpg = g.C_in / g.groups;
  const int64_t co = cb * kTcChannels + 8 * j + lane / 4;
  const int t = lane % 4;
  const int64_t group = co / cpg;
  const int64_t window = p.kw == 8 ? (co / 8) * 8 : group * cpg;
  constexpr bool kTf32 = sizeof(T) == 4;
  const int kstep = kTf32 ? 8 : 16;                    // k of one mma
  const int q = p.kw >= kstep ? p.kw / kstep : 1;       // k steps per tap
  uint32_t reg[2] = {0, 0};
  for (int e = 0; e < 2; ++e) {
    const int k = kTf32 ? t + 4 * e : 2 * t + 8 * e;
    int tap;
    int64_t ci;
    if (!kTf32 && p.kw == 8) {
      tap = 2 * s + k / 8;
      ci = window + k % 8;
    } else {
      tap = s / q;
      ci = window + kstep * (s % q) + k;
    }
    if (tap < p.taps && ci / cpg == group) {
      const T* src = w + (co * p.taps + tap) * cpg + (ci - group * cpg);
      if constexpr (kTf32) {
        reg[e] = rk::ptx::cvt_rna_tf32(*src);
      } else {
        reg[e] = *reinterpret_cast<const uint32_t*>(src);
      }
    }
  }
  out[idx] = make_uint2(reg[0], reg[1]);
}

template <typename T>
__host__ __device__ inline T from_bits16(uint16_t bits) {
  if constexpr (std::is_same_v<T, __half>) {
    __half_raw r;
    r.x = bits;
    return __half(r);
  } else {
    __nv_bfloat16_raw r;
    r.x = bits;
    return __nv_bfloat16(r);
  }
}

template <typename T>
__device__ __forceinline__ void tc_mma(float (&d)[4], const uint32_t (&a)[4], const uint2 b) {
  const uint32_t bb[2] = {b.x, b.y};
  if constexpr (std::is_same_v<T, __half>) {
    rk::ptx::mma_m16n8k16_f16(d, a, bb, d);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    rk::ptx::mma_m16n8k16_bf16(d, a, bb, d);
  } else {
    rk::ptx::mma_m16n8k8_tf32(d, a, bb, d);
  }
}

template <typename T>
__device__ __forceinline__ T tc_from_float(float v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16(v);
  } else {
    return v;
  }
}

template <typename T>
__device__ __forceinline__ float tc_to_float(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    return v;
  }
}

// A float32 operand register loaded by ldmatrix, rounded to TF32.
__device__ __forceinline__ uint32_t tf32_of_bits(uint32_t bits) {
  float f;
  memcpy(&f, &bits, sizeof(f));
  return rk::ptx::cvt_rna_tf32(f);
}

// WM, MI, NT: the warp tiling (TcWarpTile). WINDOWS: input-channel windows of a warp's 8 NT channels: 4 (groups of
// 4, 8), 2 (16), 1 (32, 64). STATS: training form (raw convolution out, per-tile channel statistics to `partials`);
// else inference form (relu?(conv * scale + shift); scale == nullptr: relu?(conv)).
template <typename T, int WINDOWS, bool STATS, int WM, int MI, int NT>
__global__ void __launch_bounds__(TcWarpTile<WM, MI, NT>::kThreads, TcWarpTile<WM, MI, NT>::kMinBlocks)
    conv_tc_fwd_kernel(const T* __restrict__ x, const uint2* __restrict__ wfrag, const float* __restrict__ scale,
                       const float* __restrict__ shift, T* __restrict__ y, float2* __restrict__ partials, ConvGeom g,
                       TcPlan p, bool relu) {
  RK_DYNAMIC_SHARED(unsigned char, smem);
  constexpr int E = sizeof(T), kPitch = tc_pitch(E), kStage = tc_stage_pitch(E);
  constexpr int kChunks = 64 * E / 16, kChunkLog2 = E == 2 ? 3 : 4;  // 16-byte chunks of a pixel's 64 channels
  constexpr int kChunkElems = 16 / E;
  constexpr int kThreads = TcWarpTile<WM, MI, NT>::kThreads, kWarpCh = 8 * NT;  // channels of a warp
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp % WM, warp_n = warp / WM;
  const int64_t tiles = p.tiles_h * p.tiles_w;
  const int64_t n0 = blockIdx.x / tiles * p.tn, tile = blockIdx.x % tiles;
  const int oy0 = int(tile / p.tiles_w) * p.th, ox0 = int(tile % p.tiles_w) * p.tw;
  const int64_t c0 = int64_t(blockIdx.y) * kTcChannels;
  const int s = g.stride_h;
  const int plane_px = p.in_th * p.plane_w;
  const int zero_px = p.smem_pixels - 1;
  const int img_pixels = p.th * p.tw, pixels = p.tn * img_pixels;
  const int images = p.tn < g.N - n0 ? p.tn : int(g.N - n0);

  // The input tiles, 8 chunks of 16 bytes a pixel; outside the image the chunks are zero-filled.
  {
    const int64_t iy0 = int64_t(oy0) * s - g.pad_h, ix0 = int64_t(ox0) * s - g.pad_w;
    const int in_px = p.in_th * p.in_tw;
    const int chunks = p.tn * in_px * kChunks;
    for (int i = tid; i < chunks; i += kThreads) {
      const int part = i & (kChunks - 1), px = i >> kChunkLog2;
      const int img = px / in_px, rest = px - img * in_px;
      const int ty = rest / p.in_tw, tx = rest - ty * p.in_tw;
      const int64_t iy = iy0 + ty, ix = ix0 + tx;
      const bool inside = img < images && iy >= 0 && iy < g.H && ix >= 0 && ix < g.W;
      const int row = img * p.img_px +
                      (p.planes == 2 ? (tx & 1) * plane_px + ty * p.plane_w + (tx >> 1) : ty * p.plane_w + tx);
      const T* src = inside ? x + (((n0 + img) * g.H + iy) * g.W + ix) * g.C_in + c0 + part * kChunkElems : x;
      rk::ptx::cp_async_cg(smem + row * kPitch + part * 16, src, inside ? 16 : 0);
    }
    if (tid < kChunks) *reinterpret_cast<uint4*>(smem + zero_px * kPitch + tid * 16) = make_uint4(0, 0, 0, 0);
  }
  // B fragments are staged per chunk (one tap's k16 steps) in two shared-memory buffers, the next chunk's copy in
  // flight while the current one is used: each fragment is read from global memory once per CTA.
  const int chunk_vectors = p.chunk_steps * 8 * 32;  // uint2 of a chunk
  const uint2* wsrc = wfrag + int64_t(blockIdx.y) * p.ksteps * 8 * 32;
  uint2* bbuf = reinterpret_cast<uint2*>(smem + p.b_offset);
  auto stage_b = [&](int chunk) {
    for (int v = tid * 2; v < chunk_vectors; v += kThreads * 2) {  // 16 bytes a copy
      rk::ptx::cp_async_cg(bbuf + (chunk & 1) * chunk_vectors + v, wsrc + int64_t(chunk) * chunk_vectors + v);
    }
  };
  stage_b(0);
  rk::ptx::cp_async_commit();  // the input tiles and the first B chunk

  const int mtiles = (pixels + 15) / 16;
  float acc[MI][NT][4];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;
  // The tile row of the input pixel under tap (0, 0) for this lane's pixel of each of the warp's m16 tiles.
  int base[MI];
#pragma unroll
  for (int i = 0; i < MI; ++i) {
    int pix = (warp_m + WM * i) * 16 + (lane & 15);
    if (pix >= pixels) pix = pixels - 1;  // the last m16 tile's spare rows: computed, never stored
    const int img = pix / img_pixels, lp = pix - img * img_pixels;
    const int oy = lp / p.tw, ox = lp - oy * p.tw;
    base[i] = img * p.img_px + oy * s * p.plane_w + (p.planes == 2 ? ox : ox * s);
  }
  int window[WINDOWS];  // first channel (of the CTA's 64) of each window of this warp
#pragma unroll
  for (int w = 0; w < WINDOWS; ++w) window[w] = ((warp_n * kWarpCh + w * (kWarpCh / WINDOWS)) / p.kw) * p.kw;
  const int khalf = lane >> 4;
  const int q = p.chunk_steps, q_log2 = q >= 8 ? 3 : q >= 4 ? 2 : q >= 2 ? 1 : 0;  // k steps per tap
  const int chunks = p.ksteps / p.chunk_steps;

  for (int step = 0; step < p.ksteps; ++step) {
    const int chunk = step / p.chunk_steps, in_chunk = step - chunk * p.chunk_steps;
    if (in_chunk == 0) {
      if (chunk > 0) __syncthreads();  // every warp is done with the buffer the next copy overwrites
      if (chunk + 1 < chunks) {
        stage_b(chunk + 1);
        rk::ptx::cp_async_commit();
        rk::ptx::cp_async_wait<1>();  // all but the copy just issued
      } else {
        rk::ptx::cp_async_wait<0>();
      }
      __syncthreads();  // every thread's copies are visible
    }
    uint2 bf[NT];
    const uint2* bw = bbuf + (chunk & 1) * chunk_vectors + (in_chunk * 8 + warp_n * NT) * 32 + lane;
#pragma unroll
    for (int j = 0; j < NT; ++j) bf[j] = bw[j * 32];
    int tap, choff;  // this lane's half of k: a tap and a channel offset in the window
    if (E == 2 && p.kw == 8) {
      tap = 2 * step + khalf;
      choff = 0;
    } else {
      tap = step >> q_log2;
      choff = (step & (q - 1)) * 2 * kChunkElems + kChunkElems * khalf;
    }
    int tap_row = -1;  // -1: the zero pixel
    if (tap < p.taps) {
      const int ky = p.taps == 9 ? (tap * 11) >> 5 : 0, kx = tap - 3 * ky;  // tap / 3 for tap < 9
      tap_row = ky * p.plane_w + (p.planes == 2 ? (kx & 1) * plane_px + (kx >> 1) : kx);
    }
#pragma unroll
    for (int i = 0; i < MI; ++i) {
      if (warp_m + WM * i >= mtiles) continue;
      const int row = tap_row < 0 ? zero_px : base[i] + tap_row;
#pragma unroll
      for (int w = 0; w < WINDOWS; ++w) {
        uint32_t a[4];
        rk::ptx::ldmatrix<4>(a, smem + row * kPitch + (window[w] + choff) * E);
        if constexpr (E == 4) {
#pragma unroll
          for (int r = 0; r < 4; ++r) a[r] = tf32_of_bits(a[r]);
        }
#pragma unroll
        for (int u = 0; u < NT / WINDOWS; ++u) {
          tc_mma<T>(acc[i][w * (NT / WINDOWS) + u], a, bf[w * (NT / WINDOWS) + u]);
        }
      }
    }
  }
  __syncthreads();  // every warp is done with the input tile: the staging below reuses it

  // Epilogue: rounded to T in a [pixel][kStage] staging tile; lane (g, t) holds channels 2t, 2t+1 of rows g, g+8.
  const int gq = lane >> 2, t4 = lane & 3;
  float2 sc[NT], sf[NT];  // the lane's channel pairs' BN scale and shift (8-byte loads: one sector per warp)
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    if (!STATS && scale != nullptr) {
      const int64_t ch = c0 + warp_n * kWarpCh + j * 8 + 2 * t4;
      sc[j] = *reinterpret_cast<const float2*>(scale + ch);
      sf[j] = *reinterpret_cast<const float2*>(shift + ch);
    }
  }
#pragma unroll
  for (int i = 0; i < MI; ++i) {
    const int mt = warp_m + WM * i;
    if (mt >= mtiles) continue;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int ch = warp_n * kWarpCh + j * 8 + 2 * t4;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int pix = mt * 16 + gq + 8 * h;
        if (pix >= pixels) continue;
        float v0 = acc[i][j][2 * h], v1 = acc[i][j][2 * h + 1];
        if (!STATS && scale != nullptr) {
          v0 = v0 * sc[j].x + sf[j].x;
          v1 = v1 * sc[j].y + sf[j].y;
        }
        if (!STATS) {
          if (relu) {
            v0 = v0 < 0.f ? 0.f : v0;  // NaN passes, as torch.relu
            v1 = v1 < 0.f ? 0.f : v1;
          }
        }
        if constexpr (E == 2) {
          const uint32_t pair = uint32_t(bits16(tc_from_float<T>(v0))) | (uint32_t(bits16(tc_from_float<T>(v1))) << 16);
          *reinterpret_cast<uint32_t*>(smem + pix * kStage + ch * 2) = pair;
        } else {
          *reinterpret_cast<float2*>(smem + pix * kStage + ch * 4) = make_float2(v0, v1);
        }
      }
    }
  }
  __syncthreads();
  const int rows = p.th < g.OH - oy0 ? p.th : int(g.OH - oy0);
  const int cols = p.tw < g.OW - ox0 ? p.tw : int(g.OW - ox0);
  for (int c = tid; c < pixels * kChunks; c += kThreads) {
    const int pix = c >> kChunkLog2, part = c & (kChunks - 1);
    const int img = pix / img_pixels, lp = pix - img * img_pixels;
    const int ty = lp / p.tw, tx = lp - ty * p.tw;
    if (img >= images || ty >= rows || tx >= cols) continue;
    const uint4 v = *reinterpret_cast<const uint4*>(smem + pix * kStage + part * 16);
    *reinterpret_cast<uint4*>(y + (((n0 + img) * g.OH + oy0 + ty) * g.OW + ox0 + tx) * g.C_out + c0 +
                              part * kChunkElems) = v;
  }
  if constexpr (STATS) {
    // Channel c = tid % 64 over the pixels p with p % kParts == tid / 64: the tile's sum, then squared deviations
    // from its mean.
    constexpr int kParts = kThreads / 64;
    float* red = reinterpret_cast<float*>(smem + p.smem_bytes - 2 * kThreads * sizeof(float));
    const int c = tid & 63, half = tid >> 6;
    const T* stage = reinterpret_cast<const T*>(smem);
    constexpr int kRow = kStage / E;
    float sum = 0.f;
    for (int pix = half; pix < pixels; pix += kParts) {
      const int img = pix / img_pixels, lp = pix - img * img_pixels;
      const int ty = lp / p.tw, tx = lp - ty * p.tw;
      if (img < images && ty < rows && tx < cols) sum += tc_to_float<T>(stage[pix * kRow + c]);
    }
    red[tid] = sum;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int k = 0; k < kParts; ++k) total += red[c + 64 * k];
    const float mean = total / float(images * rows * cols);
    float m2 = 0.f;
    for (int pix = half; pix < pixels; pix += kParts) {
      const int img = pix / img_pixels, lp = pix - img * img_pixels;
      const int ty = lp / p.tw, tx = lp - ty * p.tw;
      if (img < images && ty < rows && tx < cols) {
        const float d = tc_to_float<T>(stage[pix * kRow + c]) - mean;
        m2 += d * d;
      }
    }
    red[kThreads + tid] = m2;
    __syncthreads();
    if (half == 0) {
      float m2_total = 0.f;
#pragma unroll
      for (int k = 0; k < kParts; ++k) m2_total += red[kThreads + c + 64 * k];
      partials[int64_t(blockIdx.x) * g.C_out + c0 + c] = make_float2(total, m2_total);
    }
  }
}

// Merges the tiles' (sum, squared deviations) of one channel per thread, in tile order, by Chan's formula in
// float64; writes mean, biased variance and the BN affine map (a, b).
__global__ void conv_tc_stats_finalize_kernel(const float2* __restrict__ partials, ConvGeom g, TcPlan p, double eps,
                                              const float* __restrict__ gamma, const float* __restrict__ beta,
                                              float* __restrict__ mean, float* __restrict__ var, float* __restrict__ a,
                                              float* __restrict__ b) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= g.C_out) return;
  double count = 0.0, mu = 0.0, m2 = 0.0;
  const int64_t tiles = p.tiles_h * p.tiles_w;
  for (int64_t blk = 0; blk < p.grid_x; ++blk) {
    const int64_t tile = blk % tiles, n0 = blk / tiles * p.tn;
    const int64_t oy0 = (tile / p.tiles_w) * p.th, ox0 = (tile % p.tiles_w) * p.tw;
    const int64_t images = p.tn < g.N - n0 ? p.tn : g.N - n0;
    const double nb = double(images * (p.th < g.OH - oy0 ? p.th : g.OH - oy0) *
                             (p.tw < g.OW - ox0 ? p.tw : g.OW - ox0));
    const float2 part = partials[blk * g.C_out + c];
    const double mb = double(part.x) / nb, delta = mb - mu, total = count + nb;
    mu += delta * nb / total;
    m2 += double(part.y) + delta * delta * count * nb / total;
    count = total;
  }
  mean[c] = float(mu);
  var[c] = float(m2 / count);
  bn_affine(mean[c], var[c], gamma, beta, c, eps, a, b);
}

}  // namespace cuda_kernels
}  // namespace rk
