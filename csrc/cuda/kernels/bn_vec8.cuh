// BatchNorm + ReLU passes over a channels_last float16/bfloat16/float32 activation, 8 channels (16 or 32 bytes) per
// thread: the training form's normalization, and the backward's per-channel sums and its elementwise part. Device
// code only, torch-free (compiled by nvcc and by the emulator).
//
// Layout: M rows (pixels) of C channels, C % 8 == 0. A thread owns one octet of channels and walks rows: its
// per-channel constants are loaded once, and the threads of a warp read consecutive octets of one row (coalesced
// 16-byte accesses). A block is tx octets x ty rows (tx * ty <= 256) over `rows` rows (about 8192 elements);
// grid.x row blocks, grid.y octet blocks. The sums are reduced over a block's threads in a fixed order and written
// as one partial per (block, channel), which channel_finalize_kernel merges in block order: deterministic, no
// atomics.
#pragma once

#include <stdint.h>

#include "conv_tc.cuh"

namespace rk {
namespace cuda_kernels {

constexpr int kVec8Threads = 256;

struct Vec8Plan {
  int64_t octets;  // C / 8
  int tx, ty;      // octets and rows a block works on at once
  int64_t rows;    // rows per block
  int64_t grid_x, grid_y;
};

// About 8192 elements a block (a thread's 8 channels for 4 rows): enough blocks to fill the GPU at every width.
inline Vec8Plan vec8_plan(int64_t M, int64_t C) {
  Vec8Plan p{};
  p.octets = C / 8;
  p.tx = int(p.octets < kVec8Threads ? p.octets : kVec8Threads);
  p.ty = kVec8Threads / p.tx;
  const int64_t rows = 8192 / (p.tx * 8);
  p.rows = rows < p.ty ? p.ty : rows / p.ty * p.ty;
  p.grid_x = (M + p.rows - 1) / p.rows;
  p.grid_y = (p.octets + p.tx - 1) / p.tx;
  return p;
}

// Words of shared memory a staged per-channel vector of n channels takes (see load_channel_vectors).
__host__ __device__ constexpr int vec8_staged_words(int n) { return n + 32; }

// Dynamic shared memory of a kernel that stages `vectors` per-channel vectors (and the sums' reduction: 16 floats
// a thread).
inline size_t vec8_smem_bytes(const Vec8Plan& p, int vectors) {
  const size_t staged = size_t(vectors) * vec8_staged_words(p.tx * 8) * sizeof(float);
  const size_t reduction = size_t(kVec8Threads) * 16 * sizeof(float);
  return vectors == 3 && reduction > staged ? reduction : staged;
}

// 8 consecutive elements at p (16-byte aligned) as floats: one 16-byte load for 16-bit types, two for float32.
template <typename T>
__device__ __forceinline__ void load8v(const T* p, float (&f)[8]) {
  if constexpr (sizeof(T) == 2) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      f[k] = tc_to_float<T>(from_bits16<T>(static_cast<uint16_t>(w[k / 2] >> (16 * (k % 2)))));
    }
  } else {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float4 v = reinterpret_cast<const float4*>(p)[h];
      f[4 * h] = v.x;
      f[4 * h + 1] = v.y;
      f[4 * h + 2] = v.z;
      f[4 * h + 3] = v.w;
    }
  }
}

// Rounds 8 floats to T and stores them at p with 16-byte stores (__stwb: nvcc keeps each one instruction).
template <typename T>
__device__ __forceinline__ void store8v(T* p, const float (&f)[8]) {
  if constexpr (sizeof(T) == 2) {
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      w[k] = uint32_t(bits16(tc_from_float<T>(f[2 * k]))) | (uint32_t(bits16(tc_from_float<T>(f[2 * k + 1]))) << 16);
    }
    __stwb(reinterpret_cast<uint4*>(p), make_uint4(w[0], w[1], w[2], w[3]));
  } else {
    __stwb(reinterpret_cast<float4*>(p), make_float4(f[0], f[1], f[2], f[3]));
    __stwb(reinterpret_cast<float4*>(p) + 1, make_float4(f[4], f[5], f[6], f[7]));
  }
}

// Stages `count` per-channel vectors (`src[v][c0 .. c0 + n)`, n a multiple of 8) in shared memory with coalesced
// loads (one barrier), then gives each thread its octet's 8 values of each: dst[v][k] = src[v][c + k]. A vector is
// stored as two halves (channels 0-3 of every octet, then 4-7) whose starts differ by 16 banks: a warp's staging
// stores and each 8-lane phase of the 16-byte reads (128 consecutive bytes) are free of bank conflicts.
template <int COUNT>
__device__ __forceinline__ void load_channel_vectors(const float* const (&src)[COUNT], int64_t c0, int n,
                                                     float* smem, int64_t c, float (&dst)[COUNT][8]) {
  const int upper = n / 2 + ((16 - n / 2) & 31), stride = vec8_staged_words(n);
#pragma unroll
  for (int v = 0; v < COUNT; ++v)
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      smem[v * stride + ((i >> 2) & 1) * upper + (i >> 3) * 4 + (i & 3)] = src[v][c0 + i];
    }
  __syncthreads();
  const int off = int(c - c0) / 2;  // the octet's first word in each half
#pragma unroll
  for (int v = 0; v < COUNT; ++v) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float4 q = *reinterpret_cast<const float4*>(smem + v * stride + h * upper + off);
      dst[v][4 * h] = q.x;
      dst[v][4 * h + 1] = q.y;
      dst[v][4 * h + 2] = q.z;
      dst[v][4 * h + 3] = q.w;
    }
  }
}

// Row r's 8 values of y at channel c, and of grad masked by the forward's ReLU (y * a + b > 0, recomputed as the
// forward computed it: NaN masks).
template <typename T>
__device__ __forceinline__ void masked_row8(const T* y, const T* grad, int64_t r, int64_t C, int64_t c,
                                            const float (&av)[8], const float (&bv)[8], bool relu, float (&v)[8],
                                            float (&g)[8]) {
  load8v<T>(y + r * C + c, v);
  load8v<T>(grad + r * C + c, g);
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    if (relu && !(v[k] * av[k] + bv[k] > 0.f)) g[k] = 0.f;
  }
}

// out = relu?(y * a + b).
template <typename T>
__global__ void __launch_bounds__(kVec8Threads)
    normalize_relu_vec8_kernel(const T* __restrict__ y, const float* __restrict__ a, const float* __restrict__ b,
                               int64_t M, int64_t C, bool relu, Vec8Plan p, T* __restrict__ out) {
  RK_DYNAMIC_SHARED(float, consts);  // 2 x the block's channels
  const int64_t c0 = int64_t(blockIdx.y) * p.tx * 8, octet = int64_t(blockIdx.y) * p.tx + threadIdx.x % p.tx;
  const int n = int(C - c0 < p.tx * 8 ? C - c0 : p.tx * 8);
  const int ty = threadIdx.x / p.tx;
  const int64_t c = octet * 8;
  float v2[2][8];
  const float* const src[2] = {a, b};
  load_channel_vectors<2>(src, c0, n, consts, octet < p.octets ? c : c0, v2);
  if (octet >= p.octets || ty >= p.ty) return;  // no barrier after this
  const float(&av)[8] = v2[0];
  const float(&bv)[8] = v2[1];
  const int64_t r1 = (int64_t(blockIdx.x) + 1) * p.rows < M ? (int64_t(blockIdx.x) + 1) * p.rows : M;
  for (int64_t r = int64_t(blockIdx.x) * p.rows + ty; r < r1; r += p.ty) {
    float v[8];
    load8v<T>(y + r * C + c, v);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      v[k] = v[k] * av[k] + bv[k];
      if (relu && v[k] < 0.f) v[k] = 0.f;  // NaN passes, as torch.relu
    }
    store8v<T>(out + r * C + c, v);
  }
}

// The backward's sums per channel over a block's rows: sum g and sum g * (y - mean), g = grad masked by the
// forward's ReLU. partial[(block * 2 + k) * C + c], the
// layout channel_finalize_kernel (Finalize::kBackward) reads with nblocks = grid.x.
template <typename T>
__global__ void __launch_bounds__(kVec8Threads, 2)  // <= 128 registers: the 16 sums and 24 constants stay in them
    bn_backward_sums_vec8_kernel(const T* __restrict__ y, const T* __restrict__ grad, const float* __restrict__ mean,
                                 const float* __restrict__ a, const float* __restrict__ b, int64_t M, int64_t C,
                                 bool relu, Vec8Plan p, float* __restrict__ partial) {
  RK_DYNAMIC_SHARED(float, red);  // [16 sums][ty][tx]: consecutive lanes, consecutive words
  const int tx = threadIdx.x % p.tx, ty = threadIdx.x / p.tx;
  const int64_t c0 = int64_t(blockIdx.y) * p.tx * 8, octet = int64_t(blockIdx.y) * p.tx + tx;
  const int n = int(C - c0 < p.tx * 8 ? C - c0 : p.tx * 8);
  const bool active = octet < p.octets && ty < p.ty;
  const int64_t c = octet * 8;
  float s0[8], s1[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) s0[k] = s1[k] = 0.f;
  float v3[3][8];
  const float* const src[3] = {mean, a, b};
  load_channel_vectors<3>(src, c0, n, red, active ? c : c0, v3);
  __syncthreads();  // the constants' staging area becomes the reduction's
  if (active) {
    const float(&mv)[8] = v3[0];
    const float(&av)[8] = v3[1];
    const float(&bv)[8] = v3[2];
    const int64_t r1 = (int64_t(blockIdx.x) + 1) * p.rows < M ? (int64_t(blockIdx.x) + 1) * p.rows : M;
    for (int64_t r = int64_t(blockIdx.x) * p.rows + ty; r < r1; r += p.ty) {
      float v[8], gk[8];
      masked_row8<T>(y, grad, r, C, c, av, bv, relu, v, gk);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        s0[k] += gk[k];
        s1[k] += gk[k] * (v[k] - mv[k]);
      }
    }
  }
  // Over the block's rows, in ty order.
  const int plane = p.ty * p.tx;
  if (ty < p.ty) {
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      red[k * plane + ty * p.tx + tx] = s0[k];
      red[(8 + k) * plane + ty * p.tx + tx] = s1[k];
    }
  }
  __syncthreads();
  if (ty == 0 && active) {
    for (int j = 1; j < p.ty; ++j) {
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        s0[k] += red[k * plane + j * p.tx + tx];
        s1[k] += red[(8 + k) * plane + j * p.tx + tx];
      }
    }
    float4* out0 = reinterpret_cast<float4*>(partial + int64_t(blockIdx.x) * 2 * C + c);
    float4* out1 = reinterpret_cast<float4*>(partial + (int64_t(blockIdx.x) * 2 + 1) * C + c);
    out0[0] = make_float4(s0[0], s0[1], s0[2], s0[3]);
    out0[1] = make_float4(s0[4], s0[5], s0[6], s0[7]);
    out1[0] = make_float4(s1[0], s1[1], s1[2], s1[3]);
    out1[1] = make_float4(s1[4], s1[5], s1[6], s1[7]);
  }
}

// grad_y = k1 * g - k2 - k3 * (y - mean), g = grad masked by the forward's ReLU.
template <typename T>
__global__ void __launch_bounds__(kVec8Threads)
    bn_relu_backward_vec8_kernel(const T* __restrict__ y, const T* __restrict__ grad, const float* __restrict__ mean,
                                 const float* __restrict__ a, const float* __restrict__ b, const float* __restrict__ k1,
                                 const float* __restrict__ k2, const float* __restrict__ k3, int64_t M, int64_t C,
                                 bool relu, Vec8Plan p, T* __restrict__ grad_y) {
  RK_DYNAMIC_SHARED(float, consts);  // 6 x the block's channels
  const int64_t c0 = int64_t(blockIdx.y) * p.tx * 8, octet = int64_t(blockIdx.y) * p.tx + threadIdx.x % p.tx;
  const int n = int(C - c0 < p.tx * 8 ? C - c0 : p.tx * 8);
  const int ty = threadIdx.x / p.tx;
  const int64_t c = octet * 8;
  float v6[6][8];
  const float* const src[6] = {mean, a, b, k1, k2, k3};
  load_channel_vectors<6>(src, c0, n, consts, octet < p.octets ? c : c0, v6);
  if (octet >= p.octets || ty >= p.ty) return;  // no barrier after this
  const float(&mv)[8] = v6[0];
  const float(&av)[8] = v6[1];
  const float(&bv)[8] = v6[2];
  const float(&c1)[8] = v6[3];
  const float(&c2)[8] = v6[4];
  const float(&c3)[8] = v6[5];
  const int64_t r1 = (int64_t(blockIdx.x) + 1) * p.rows < M ? (int64_t(blockIdx.x) + 1) * p.rows : M;
  for (int64_t r = int64_t(blockIdx.x) * p.rows + ty; r < r1; r += p.ty) {
    float v[8], gk[8];
    masked_row8<T>(y, grad, r, C, c, av, bv, relu, v, gk);
#pragma unroll
    for (int k = 0; k < 8; ++k) gk[k] = c1[k] * gk[k] - c2[k] - c3[k] * (v[k] - mv[k]);
    store8v<T>(grad_y + r * C + c, gk);
  }
}

}  // namespace cuda_kernels
}  // namespace rk
