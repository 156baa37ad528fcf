// Test kernels of csrc/cuda/kernels/ptx.cuh and of the emulator's counters. Compiled by g++ for the emulator
// (tests/emu/emu_selftest.cpp) and by nvcc (tests/emu/ptx_kernels.cu, whose SASS test_emulator.py reads), so the
// wrappers' two implementations are built from the same kernels.
#pragma once

#include <stdint.h>

#include "cuda/kernels/ptx.cuh"

namespace ptx_selftest {

constexpr int kMmaF16 = 0, kMmaBF16 = 1, kMmaTF32 = 2;

// One warp computes D (16x8, row-major fp32) = A * B + C. A is 16xK row-major, B is stored per column ([n][k]), as
// 16-bit patterns for f16/bf16 (K = 16) or fp32 for tf32 (K = 8, rounded by cvt.rna.tf32). Each lane gathers its
// fragments from global memory by the PTX ISA's layout formulas, independently of ldmatrix.
template <int Kind>
__global__ void mma_kernel(const void* A, const void* B, const float* C, float* D) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  uint32_t a[4], b[2];
  float c[4], d[4];
  if constexpr (Kind == kMmaTF32) {
    const float* Af = static_cast<const float*>(A);
    const float* Bf = static_cast<const float*>(B);
    for (int i = 0; i < 4; ++i) a[i] = rk::ptx::cvt_rna_tf32(Af[(g + 8 * (i % 2)) * 8 + t + 4 * (i / 2)]);
    for (int i = 0; i < 2; ++i) b[i] = rk::ptx::cvt_rna_tf32(Bf[g * 8 + t + 4 * i]);
  } else {
    const uint16_t* Ah = static_cast<const uint16_t*>(A);
    const uint16_t* Bh = static_cast<const uint16_t*>(B);
    for (int r = 0; r < 4; ++r) {
      uint32_t v = 0;
      for (int h = 0; h < 2; ++h) {
        const int i = 2 * r + h;
        v |= uint32_t(Ah[(g + 8 * ((i / 2) % 2)) * 16 + 2 * t + i % 2 + 8 * (i / 4)]) << (16 * h);
      }
      a[r] = v;
    }
    for (int r = 0; r < 2; ++r) {
      uint32_t v = 0;
      for (int h = 0; h < 2; ++h) {
        const int i = 2 * r + h;
        v |= uint32_t(Bh[g * 16 + 2 * t + i % 2 + 8 * (i / 2)]) << (16 * h);
      }
      b[r] = v;
    }
  }
  for (int i = 0; i < 4; ++i) c[i] = C[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2];
  if constexpr (Kind == kMmaF16) rk::ptx::mma_m16n8k16_f16(d, a, b, c);
  if constexpr (Kind == kMmaBF16) rk::ptx::mma_m16n8k16_bf16(d, a, b, c);
  if constexpr (Kind == kMmaTF32) rk::ptx::mma_m16n8k8_tf32(d, a, b, c);
  for (int i = 0; i < 4; ++i) D[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = d[i];
}

// The three instructions together, as a tensor-core kernel uses them: A (16x16 row-major f16) and B (per column,
// [n][k], 8x16) are copied to shared memory by 16-byte cp.async, loaded into fragments by ldmatrix (.x4 for A:
// lane l gives row l % 16 at column (l / 16) * 8; .x2 for B: lane l gives column l % 8 at k ((l / 8) % 2) * 8) and
// multiplied. These ldmatrix fragments are the ones mma.sync takes: the test checks the two layouts together.
__global__ void mma_ldmatrix_kernel(const uint16_t* A, const uint16_t* B, float* D) {
  RK_DYNAMIC_SHARED(uint16_t, s);  // A: 256 elements, then B: 128
  const int lane = threadIdx.x;
  rk::ptx::cp_async_cg(s + 8 * lane, A + 8 * lane);
  if (lane < 16) rk::ptx::cp_async_cg(s + 256 + 8 * lane, B + 8 * lane);
  rk::ptx::cp_async_wait_all();
  __syncthreads();
  uint32_t a[4], b[2];
  rk::ptx::ldmatrix<4>(a, s + (lane % 16) * 16 + (lane / 16) * 8);
  rk::ptx::ldmatrix<2>(b, s + 256 + (lane % 8) * 16 + ((lane / 8) % 2) * 8);
  const float c[4] = {0.f, 0.f, 0.f, 0.f};
  float d[4];
  rk::ptx::mma_m16n8k16_f16(d, a, b, c);
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) D[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = d[i];
}

// cvt.rna.tf32.f32 of 32 values, one per lane.
__global__ void tf32_kernel(const float* in, uint32_t* out) { out[threadIdx.x] = rk::ptx::cvt_rna_tf32(in[threadIdx.x]); }

// One warp: Num 8x8 matrices of 16-bit values (stacked, `pitch` elements per row) are copied into shared memory,
// then ldmatrix'ed; lane l writes its registers to out[l * Num + m].
template <int Num, bool Trans>
__global__ void ldmatrix_kernel(const uint16_t* src, int pitch, uint32_t* out) {
  RK_DYNAMIC_SHARED(uint16_t, tile);
  const int lane = threadIdx.x;
  for (int i = lane; i < 8 * Num * pitch; i += 32) tile[i] = src[i];
  __syncthreads();
  uint32_t r[Num];
  rk::ptx::ldmatrix<Num, Trans>(r, tile + (lane % (8 * Num)) * pitch);
  for (int m = 0; m < Num; ++m) out[lane * Num + m] = r[m];
}

// Each thread copies 16 bytes of src (n floats, the last chunk partial and zero-filled) into shared memory with
// cp.async.cg, then, by `mode`:
//   0: waits, synchronizes, writes the tile to dst;
//   1: synchronizes and writes the tile to dst without waiting (a bug: the bytes have not landed);
//   2: also copies 4 bytes with cp.async.ca<4> and 8 with <8> in a second group, waits for the first group only
//      (wait_group 1), then for all, and writes both;
// and in every mode waits for everything before it exits.
__global__ void cp_async_kernel(const float* src, int n, float* dst, int mode) {
  RK_DYNAMIC_SHARED(float, tile);
  const int i = threadIdx.x;
  const int valid = n - 4 * i < 0 ? 0 : (n - 4 * i > 4 ? 4 : n - 4 * i);
  rk::ptx::cp_async_cg(tile + 4 * i, valid > 0 ? src + 4 * i : src, 4 * valid);
  rk::ptx::cp_async_commit();
  if (mode == 2) {
    rk::ptx::cp_async_ca<4>(tile + 4 * blockDim.x + 4 * i, src + 4 * i);
    rk::ptx::cp_async_ca<8>(tile + 4 * blockDim.x + 4 * i + 2, src + 4 * i + 2);
    rk::ptx::cp_async_commit();
    rk::ptx::cp_async_wait<1>();
    dst[4 * i] = tile[4 * i];  // the first group has landed
    rk::ptx::cp_async_wait<0>();
    __syncthreads();
    for (int j = 0; j < 4; ++j) dst[4 * blockDim.x + 4 * i + j] = j == 1 ? 0.f : tile[4 * blockDim.x + 4 * i + j];
    for (int j = 1; j < 4; ++j) dst[4 * i + j] = tile[4 * i + j];
    return;
  }
  if (mode == 0) rk::ptx::cp_async_wait<0>();
  __syncthreads();
  for (int j = 0; j < 4; ++j) dst[4 * i + j] = tile[4 * i + j];
  rk::ptx::cp_async_wait_all();
}

// ---- broken uses: each must be a KernelError naming this file ----------------------------------------------

__global__ void mma_exited_lane(float* out) {
  if (threadIdx.x == 3) return;
  uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  float c[4] = {0, 0, 0, 0}, d[4];
  rk::ptx::mma_m16n8k16_f16(d, a, b, c);
  out[threadIdx.x] = d[0];
}

__global__ void mma_diverged(float* out) {
  uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  float c[4] = {0, 0, 0, 0}, d[4];
  if (threadIdx.x < 16) {
    rk::ptx::mma_m16n8k16_f16(d, a, b, c);
  } else {
    rk::ptx::mma_m16n8k16_f16(d, a, b, c);
  }
  out[threadIdx.x] = d[0];
}

__global__ void ldmatrix_lane_missing(float* out) {
  RK_DYNAMIC_SHARED(uint16_t, tile);
  if (threadIdx.x == 31) return;
  uint32_t r[1];
  rk::ptx::ldmatrix<1>(r, tile + (threadIdx.x % 8) * 8);
  out[threadIdx.x] = float(r[0]);
}

__global__ void ldmatrix_misaligned(float* out) {
  RK_DYNAMIC_SHARED(uint16_t, tile);
  uint32_t r[1];
  rk::ptx::ldmatrix<1>(r, tile + (threadIdx.x % 8) * 8 + 1);
  out[threadIdx.x] = float(r[0]);
}

__global__ void ldmatrix_from_global(const uint16_t* src, float* out) {
  uint32_t r[1];
  rk::ptx::ldmatrix<1>(r, src + (threadIdx.x % 8) * 8);
  out[threadIdx.x] = float(r[0]);
}

__global__ void cp_async_never_waited(const float* src) {
  RK_DYNAMIC_SHARED(float, tile);
  rk::ptx::cp_async_cg(tile + 4 * threadIdx.x, src + 4 * threadIdx.x);
  rk::ptx::cp_async_commit();
}

__global__ void cp_async_to_global(const float* src, float* dst) {
  rk::ptx::cp_async_cg(dst + 4 * threadIdx.x, src + 4 * threadIdx.x);
  rk::ptx::cp_async_wait_all();
}

// ---- counters ---------------------------------------------------------------------------------------------

// One warp, every access pattern the counters distinguish (the expected counts are in tests/test_emulator.py).
// in: 2048 floats; in4: 32 float4; s: 1152 floats of dynamic shared memory.
__global__ void counter_patterns(const float* in, const float4* in4, float* out, float4* out4) {
  RK_DYNAMIC_SHARED(float, s);
  const int l = threadIdx.x;
  float acc = in[l];                    // 4-byte, consecutive: 128 B in 4 sectors
  acc += in[1024 + 32 * l];             // 4-byte, 128 B apart: 32 sectors
  const float4 v = in4[l];              // 16-byte, consecutive: 512 B in 16 sectors
  for (int r = 0; r < 2; ++r) acc += reinterpret_cast<const volatile float*>(in)[l];  // the same 4 sectors twice
  out[l] = acc + v.x;                   // store: 128 B in 4 sectors
  s[l] = acc;                           // 1 wavefront
  s[64 + 2 * l] = acc;                  // 2 lanes per bank: 2 wavefronts
  s[128 + 32 * l] = acc;                // every lane in bank 0: 32 wavefronts
  __syncthreads();
  acc += s[0];                          // one word for all lanes: 1 wavefront
  const float2 w2 = reinterpret_cast<const float2*>(s)[l];  // 64-bit, consecutive: 2 wavefronts
  const float4 w4 = reinterpret_cast<const float4*>(s)[l];  // 128-bit, consecutive: 4 wavefronts
  out4[l] = make_float4(acc, w2.x + w2.y, w4.x + w4.y + w4.z + w4.w, v.y + v.z + v.w);  // 512 B in 16 sectors
}

// Lanes run a load a different number of times: the counters flag those warp instructions as diverged.
__global__ void counter_diverged(const float* in, float* out) {
  float acc = 0.f;
  for (int i = 0; i <= int(threadIdx.x % 2); ++i) acc += in[32 * i + threadIdx.x];
  out[threadIdx.x] = acc;
}

}  // namespace ptx_selftest
