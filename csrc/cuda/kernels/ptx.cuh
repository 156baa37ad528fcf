// The project's only inline PTX: tensor-core (mma.sync, ldmatrix) and asynchronous-copy (cp.async) instructions.
// Under nvcc each wrapper is one PTX instruction (sm_80 and newer; older architectures trap). Under the
// CUDA-on-CPU emulator (RK_EMULATOR) each is executed by csrc/emu/emu_ptx.cpp: mma.sync and ldmatrix as warp
// collectives that follow the PTX ISA's fragment layouts in every lane (an exited, missing or diverged lane is a
// KernelError naming the caller's file:line), cp.async with per-thread commit groups whose bytes land in shared
// memory only at the cp.async.wait_group that covers them. The emulated mma adds exact fp32 products to the fp32
// accumulator in k order, rounding each sum; the tensor cores' own order and rounding are undocumented and may
// differ in the last bits.
//
// Fragments (groupID g = lane / 4, t = lane % 4), as the PTX ISA defines them:
//   m16n8k16 f16/bf16: a[r] holds A elements 2r, 2r+1 (low half first): element i is at row g + 8 * ((i / 2) % 2),
//                      col 2t + i % 2 + 8 * (i / 4); b[r] holds B elements 2r, 2r+1: element i at row
//                      2t + i % 2 + 8 * (i / 2), col g.
//   m16n8k8 tf32:      a[i] at row g + 8 * (i % 2), col t + 4 * (i / 2); b[i] at row t + 4i, col g.
//   C and D (fp32):    c[i] at row g + 8 * (i / 2), col 2t + i % 2.
#pragma once

#include <stdint.h>

#include "rk_launch.cuh"

#if defined(RK_EMULATOR)
#include <cstring>
// The caller's source location, for the emulator's error messages (defaulted arguments under g++ only).
#define RK_PTX_CALLER_FIRST const char *rk_file = __builtin_FILE(), int rk_line = __builtin_LINE()
#define RK_PTX_CALLER , RK_PTX_CALLER_FIRST
#else
#define RK_PTX_CALLER_FIRST
#define RK_PTX_CALLER
#endif

namespace rk {
namespace ptx {

#if defined(RK_EMULATOR)
namespace detail {
inline void emulated_mma(emu::Collective kind, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                         const float (&c)[4], const char* file, int line) {
  emu::MmaOperands op;
  for (int i = 0; i < 4; ++i) op.a[i] = a[i], op.c[i] = c[i];
  op.b[0] = b[0];
  op.b[1] = b[1];
  emu::warp_exchange(emu::WarpOp::kCollective, 0xffffffffu, static_cast<uint64_t>(kind), 0, 32, file, line, &op);
  for (int i = 0; i < 4; ++i) d[i] = op.d[i];
}
}  // namespace detail
#else
__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// d = a * b + c with fp32 accumulators, one warp. mma_m16n8k16_f16 / _bf16: A 16x16 row-major, B 16x8
// column-major, in f16 / bf16. mma_m16n8k8_tf32: A 16x8, B 8x8 in tf32 (operands from cvt_rna_tf32; the low 13
// bits of an operand register are not used).
#if defined(RK_EMULATOR)
#define RK_PTX_MMA(NAME, KIND, INSTRUCTION)                                                                     \
  __device__ __forceinline__ void NAME(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],          \
                                       const float (&c)[4] RK_PTX_CALLER) {                                    \
    detail::emulated_mma(emu::Collective::KIND, d, a, b, c, rk_file, rk_line);                                 \
  }
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define RK_PTX_MMA(NAME, KIND, INSTRUCTION)                                                                     \
  __device__ __forceinline__ void NAME(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],          \
                                       const float (&c)[4]) {                                                  \
    asm volatile(INSTRUCTION " {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"                  \
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])                                              \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),     \
                   "f"(c[2]), "f"(c[3]));                                                                      \
  }
#else
#define RK_PTX_MMA(NAME, KIND, INSTRUCTION)                                                                     \
  __device__ __forceinline__ void NAME(float (&)[4], const uint32_t (&)[4], const uint32_t (&)[2],             \
                                       const float (&)[4]) {                                                   \
    __trap();                                                                                                  \
  }
#endif
RK_PTX_MMA(mma_m16n8k16_f16, kMmaF16, "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32")
RK_PTX_MMA(mma_m16n8k16_bf16, kMmaBF16, "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32")
RK_PTX_MMA(mma_m16n8k8_tf32, kMmaTF32, "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32")
#undef RK_PTX_MMA

// cvt.rna.tf32.f32: x rounded to tf32 (10 mantissa bits, nearest, ties away from zero), in a .b32 register whose
// low 13 bits are zero. NaN gives the canonical NaN 0x7fffffff.
__device__ __forceinline__ uint32_t cvt_rna_tf32(float x) {
#if defined(RK_EMULATOR)
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  if ((u & 0x7f800000u) == 0x7f800000u) return (u & 0x007fffffu) ? 0x7fffffffu : u;  // NaN, +-Inf
  return (u + 0x1000u) & 0xffffe000u;  // half an ulp added to the magnitude: ties round away from zero
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t u;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(u) : "f"(x));
  return u;
#else
  __trap();
  return 0;
#endif
}

// ldmatrix.sync.aligned.m8n8.x{Num}{.trans}.shared.b16: lanes 8m .. 8m+7 pass the 16-byte-aligned shared-memory
// addresses of rows 0-7 of matrix m; lane l receives in r[m] the pair (row l / 4, cols 2 (l % 4), +1) of matrix m,
// or with Trans the pair (rows 2 (l % 4), +1; col l / 4). Every lane of the warp must execute it.
template <int Num, bool Trans = false>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[Num], const void* row RK_PTX_CALLER) {
  static_assert(Num == 1 || Num == 2 || Num == 4, "ldmatrix loads 1, 2 or 4 matrices");
#if defined(RK_EMULATOR)
  emu::LdmatrixOperands op;
  op.row = row;
  emu::warp_exchange(emu::WarpOp::kCollective, 0xffffffffu, static_cast<uint64_t>(emu::Collective::kLdmatrix),
                     Num | (Trans ? 8 : 0), 32, rk_file, rk_line, &op);
  for (int i = 0; i < Num; ++i) r[i] = op.r[i];
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t a = smem_address(row);
  if constexpr (Num == 1 && !Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a) : "memory");
  } else if constexpr (Num == 1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a) : "memory");
  } else if constexpr (Num == 2 && !Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(a) : "memory");
  } else if constexpr (Num == 2) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(a) : "memory");
  } else if constexpr (!Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a) : "memory");
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a) : "memory");
  }
#else
  __trap();
#endif
}

// cp.async.ca.shared.global (L1-allocating) of Bytes (4, 8 or 16) from global `src` to shared `dst`, both aligned
// to Bytes: src_bytes (0..Bytes) are read, the rest of the Bytes zero-filled (the halo of a tile: src_bytes = 0).
template <int Bytes>
__device__ __forceinline__ void cp_async_ca(void* dst, const void* src, int src_bytes = Bytes RK_PTX_CALLER) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
#if defined(RK_EMULATOR)
  emu::cp_async(dst, src, Bytes, src_bytes, false, rk_file, rk_line);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(smem_address(dst)), "l"(src), "n"(Bytes),
               "r"(src_bytes)
               : "memory");
#else
  __trap();
#endif
}

// cp.async.cg.shared.global (bypasses L1): 16 bytes, as cp_async_ca.
__device__ __forceinline__ void cp_async_cg(void* dst, const void* src, int src_bytes = 16 RK_PTX_CALLER) {
#if defined(RK_EMULATOR)
  emu::cp_async(dst, src, 16, src_bytes, true, rk_file, rk_line);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(dst)), "l"(src),
               "r"(src_bytes)
               : "memory");
#else
  __trap();
#endif
}

// cp.async.commit_group: the thread's cp.asyncs since the last commit form one group.
__device__ __forceinline__ void cp_async_commit(RK_PTX_CALLER_FIRST) {
#if defined(RK_EMULATOR)
  emu::cp_async_commit(rk_file, rk_line);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#else
  __trap();
#endif
}

// cp.async.wait_group N: waits until at most N of the thread's committed groups are in flight. Other threads see
// the bytes after a __syncthreads.
template <int N>
__device__ __forceinline__ void cp_async_wait(RK_PTX_CALLER_FIRST) {
  static_assert(N >= 0 && N <= 7, "cp.async.wait_group takes 0..7");
#if defined(RK_EMULATOR)
  emu::cp_async_wait(N, rk_file, rk_line);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#else
  __trap();
#endif
}

// cp.async.wait_all: commit_group, then wait_group 0.
__device__ __forceinline__ void cp_async_wait_all(RK_PTX_CALLER_FIRST) {
#if defined(RK_EMULATOR)
  emu::cp_async_commit(rk_file, rk_line);
  emu::cp_async_wait(0, rk_file, rk_line);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#else
  __trap();
#endif
}

}  // namespace ptx
}  // namespace rk

#undef RK_PTX_CALLER
#undef RK_PTX_CALLER_FIRST
