// CUDA kernel of conv_bn_relu_infer: grouped KxK convolution + folded BatchNorm + optional ReLU, NHWC.
// Device code only, torch-free: compiled by nvcc and, through rk_launch.cuh, by g++ for the emulator.
//
// Tiling. A block of 256 threads computes an 8x8 tile of output pixels of one image for a chunk of 32
// output channels (grid.x: image x tile rows x tile columns, grid.y: channel chunks). The chunk's output
// channels read the input channels of their groups, a contiguous range [cin0, cin1); the block walks that
// range in slices of ci_tile channels. For each slice it stages in shared memory
//   * the input tile with its halo, (8 - 1) * stride + (K - 1) * dilation + 1 rows and columns, zero
//     outside the image (so the inner loop has no bounds checks), loaded channel-fastest so that
//     consecutive threads read consecutive NHWC addresses, and
//   * the chunk's weights for the slice, [32 channels][KH * KW][ci_tile], zero where a channel's group does
//     not own an input channel of the slice.
// Thread t owns output pixel t % 64 and 8 output channels (t / 64) * 8 .. + 7 of the chunk, accumulating in
// fp32 (fp64 for double) registers; for each channel it visits only its own group's input channels, so
// narrow groups (ResNeXt's 4 per group, depthwise) do no wasted multiply-adds. The epilogue applies
// scale/shift (the folded BN) and the ReLU and writes the 8 channels once. ci_tile is the largest of
// 16, 8, 4, 2, 1 whose staging fits 48 KiB of shared memory; cases where even 1 does not fit are reported
// by conv_bn_relu_fwd_plan as unsupported (the Python layer then runs ATen/cuDNN).
// Global offsets are 64-bit; grid.x is limited to 2^31 - 1 blocks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#include "../../common/conv_geometry.h"
#include "conv_bn_relu_fwd_plan.h"
#include "rk_launch.cuh"

namespace rk {
namespace cuda_kernels {

__host__ __device__ inline float to_acc(float v) { return v; }
__host__ __device__ inline double to_acc(double v) { return v; }
__host__ __device__ inline float to_acc(__half v) { return __half2float(v); }
__host__ __device__ inline float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// Rounds an accumulator to the storage type T (Acc is double only for T = double).
template <typename T, typename Acc>
__host__ __device__ inline T from_acc(Acc v) {
  if constexpr (sizeof(T) == sizeof(Acc)) {
    return T(v);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else {
    return __float2bfloat16(v);
  }
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads, 2)  // 2 resident blocks: <= 128 registers, no spills
    conv_bn_relu_fwd_kernel(const T* __restrict__ input, const T* __restrict__ weight,
                            const Acc* __restrict__ scale, const Acc* __restrict__ shift, T* __restrict__ out,
                            ConvGeom g, FwdPlan p, bool relu) {
  RK_DYNAMIC_SHARED(Acc, smem);
  const int in_plane = p.in_tile_h * p.in_tile_w;
  Acc* s_in = smem;                           // [ci_tile][in_tile_h][in_tile_w]
  Acc* s_w = smem + size_t(p.ci_tile) * in_plane;  // [kChannelsPerBlock][KH * KW][ci_tile]
  const int taps = g.KH * g.KW;

  const int64_t tiles_per_image = p.tiles_h * p.tiles_w;
  const int64_t n = blockIdx.x / tiles_per_image;
  const int64_t tile = blockIdx.x % tiles_per_image;
  const int64_t oh0 = (tile / p.tiles_w) * kTile, ow0 = (tile % p.tiles_w) * kTile;
  const int64_t co0 = int64_t(blockIdx.y) * kChannelsPerBlock;
  const int64_t cpg_in = g.C_in / g.groups, cpg_out = g.C_out / g.groups;
  const int64_t co_end = co0 + kChannelsPerBlock < g.C_out ? co0 + kChannelsPerBlock : g.C_out;
  const int64_t cin0 = (co0 / cpg_out) * cpg_in;
  const int64_t cin1 = ((co_end - 1) / cpg_out + 1) * cpg_in;
  const int64_t ih0 = oh0 * g.stride_h - g.pad_h, iw0 = ow0 * g.stride_w - g.pad_w;

  const int tid = threadIdx.x;
  const int pix = tid % kPixels;
  const int py = pix / kTile, px = pix % kTile;
  const int c_first = (tid / kPixels) * kChannelsPerThread;  // first chunk channel of this thread
  const int64_t oh = oh0 + py, ow = ow0 + px;

  Acc acc[kChannelsPerThread];
#pragma unroll
  for (int j = 0; j < kChannelsPerThread; ++j) acc[j] = Acc(0);

  for (int64_t cs = cin0; cs < cin1; cs += p.ci_tile) {
    const int nci = int(cin1 - cs < p.ci_tile ? cin1 - cs : p.ci_tile);
    __syncthreads();  // the previous slice has been consumed
    for (int i = tid; i < nci * in_plane; i += kThreads) {
      const int c = i % nci, pos = i / nci;
      const int64_t ih = ih0 + pos / p.in_tile_w, iw = iw0 + pos % p.in_tile_w;
      Acc v = Acc(0);
      if (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) v = to_acc(input[((n * g.H + ih) * g.W + iw) * g.C_in + cs + c]);
      s_in[c * in_plane + pos] = v;
    }
    for (int i = tid; i < kChannelsPerBlock * taps * nci; i += kThreads) {
      const int c = i % nci, k = (i / nci) % taps, co_l = i / (nci * taps);
      const int64_t co = co0 + co_l;
      const int64_t ci_local = cs + c - (co / cpg_out) * cpg_in;
      Acc v = Acc(0);
      if (co < g.C_out && ci_local >= 0 && ci_local < cpg_in) v = to_acc(weight[(co * taps + k) * cpg_in + ci_local]);
      s_w[(co_l * taps + k) * p.ci_tile + c] = v;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kChannelsPerThread; ++j) {  // unrolled: acc stays in registers
      const int64_t co = co0 + c_first + j;
      if (co >= g.C_out) continue;
      const int64_t grp_in0 = (co / cpg_out) * cpg_in;
      const int c_begin = int((grp_in0 > cs ? grp_in0 : cs) - cs);
      const int c_end = int((grp_in0 + cpg_in < cs + nci ? grp_in0 + cpg_in : cs + nci) - cs);
      const Acc* w = s_w + (c_first + j) * taps * p.ci_tile;
      Acc sum = acc[j];
      for (int kh = 0; kh < g.KH; ++kh) {
        for (int kw = 0; kw < g.KW; ++kw) {
          const Acc* x = s_in + (py * g.stride_h + kh * g.dil_h) * p.in_tile_w + px * g.stride_w + kw * g.dil_w;
          const Acc* wk = w + (kh * g.KW + kw) * p.ci_tile;
          for (int c = c_begin; c < c_end; ++c) sum += x[c * in_plane] * wk[c];
        }
      }
      acc[j] = sum;
    }
  }

  if (oh < g.OH && ow < g.OW) {
    T* o = out + ((n * g.OH + oh) * g.OW + ow) * g.C_out;
#pragma unroll
    for (int j = 0; j < kChannelsPerThread; ++j) {
      const int64_t co = co0 + c_first + j;
      if (co >= g.C_out) continue;
      Acc v = acc[j] * scale[co] + shift[co];
      if (relu && v < Acc(0)) v = Acc(0);  // NaN passes, as torch.relu
      o[co] = from_acc<T, Acc>(v);
    }
  }
}

}  // namespace cuda_kernels
}  // namespace rk
