// Vector types and loads/stores of the CPU kernels (GCC vector extensions). Every function is always_inline, so each
// ISA entry point (a function with its own target attribute) gets code for its own vector width.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#include "cpu/isa.h"

namespace rk {
namespace cpu {

struct Avx512Vec {
  typedef float vec __attribute__((vector_size(64)));
  typedef int32_t ivec __attribute__((vector_size(64)));
  static constexpr int kLanes = 16;
  static constexpr int kAccRegs = 24;  // of 32 zmm registers
  static constexpr int kMaxBroadcastVectors = 4;  // see Avx2Vec
};
struct Avx2Vec {
  typedef float vec __attribute__((vector_size(32)));
  typedef int32_t ivec __attribute__((vector_size(32)));
  static constexpr int kLanes = 8;
  static constexpr int kAccRegs = 12;  // of 16 ymm registers
  // Vectors of output channels a broadcast-operand microkernel (TP x NV accumulators, NV weight vectors shared by
  // the TP pixels, one broadcast input) takes at most: 12 + 2 + 1 of the 16 ymm registers. With 4, 12 + 4 + 1 do
  // not fit and the weights turn into reloads.
  static constexpr int kMaxBroadcastVectors = 2;
};
// 8-lane (ymm) vectors in AVX-512 code, which has 32 of them: the Winograd path's groups of 8 channels where the
// group count is odd (two groups of 8 otherwise share 16-lane vectors: winograd_paired).
struct Avx512YmmVec {
  typedef float vec __attribute__((vector_size(32)));
  static constexpr int kLanes = 8;
  static constexpr int kAccRegs = 24;
  static constexpr int kMaxBroadcastVectors = 4;  // of 32 registers, as Avx512Vec
};

// dst[0..n) = src[0..n) for a pixel's few dozen channels, inlined: in 64-byte moves, then element by element (a
// library memmove call per pixel costs more than the copy).
template <typename T>
RK_ALWAYS_INLINE void copy_channels(const T* __restrict src, T* __restrict dst, int64_t n) {
  constexpr int64_t kChunk = 64 / int64_t(sizeof(T));
  int64_t i = 0;
  for (; i + kChunk <= n; i += kChunk) __builtin_memcpy(dst + i, src + i, 64);
  for (; i < n; ++i) dst[i] = src[i];
}

template <class V>
RK_ALWAYS_INLINE typename V::vec vload(const float* p) {
  typename V::vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <class V>
RK_ALWAYS_INLINE typename V::vec vload(const c10::BFloat16* p) {
  typename V::vec v;
  for (int i = 0; i < V::kLanes; ++i) v[i] = static_cast<float>(p[i]);
  return v;
}

template <class V>
RK_ALWAYS_INLINE void vstore(float* p, typename V::vec v) {
  std::memcpy(p, &v, sizeof(v));
}

template <class V>
RK_ALWAYS_INLINE void vstore(c10::BFloat16* p, typename V::vec v) {
  for (int i = 0; i < V::kLanes; ++i) p[i] = c10::BFloat16(v[i]);
}

// A non-temporal store of one 64-byte vector (p 64-byte aligned); a plain store elsewhere.
template <class V>
RK_ALWAYS_INLINE void vstream(float* p, typename V::vec v) {
#if defined(__x86_64__)
  if constexpr (sizeof(v) == 64) {
    asm volatile("vmovntps %1, %0" : "=m"(*reinterpret_cast<typename V::vec*>(p)) : "v"(v));
    return;
  }
#endif
  vstore<V>(p, v);
}
template <class V>
RK_ALWAYS_INLINE void vstream(c10::BFloat16* p, typename V::vec v) {
  vstore<V>(p, v);
}

// Orders this thread's non-temporal stores before what follows (the end of a parallel task).
RK_ALWAYS_INLINE void stream_fence() {
#if defined(__x86_64__)
  asm volatile("sfence" ::: "memory");
#endif
}

}  // namespace cpu
}  // namespace rk
