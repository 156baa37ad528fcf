// Self-tests of the CUDA-on-CPU emulator: correct kernels must give exact results under every schedule,
// and each class of bug a GPU would let slip must be caught. Torch-free; built and driven by
// tests/test_emulator.py. Usage: emu_selftest <case> [order] [seed]; prints "OK <detail>" or the error and
// exits 0 when the case behaved as expected, 1 otherwise.
#include "cuda/kernels/rk_launch.cuh"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "ptx_kernels.cuh"

namespace {

// ---- correct kernels -----------------------------------------------------------------------------------

// Block sum: warp shuffles, then one value per warp through shared memory.
__global__ void block_sum(const float* in, float* out, int n) {
  __shared__ float warp_sums[32];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = i < n ? in[i] : 0.f;
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    float w = threadIdx.x < blockDim.x / 32 ? warp_sums[threadIdx.x] : 0.f;
    for (int offset = 16; offset > 0; offset /= 2) w += __shfl_xor_sync(0xffffffffu, w, offset);
    if (threadIdx.x == 0) out[blockIdx.x] = w;
  }
}

// Reverses each block's slice through dynamic shared memory (needs the barrier).
__global__ void reverse_in_block(const float* in, float* out, bool with_barrier) {
  RK_DYNAMIC_SHARED(float, tile);
  const int base = blockIdx.x * blockDim.x;
  tile[threadIdx.x] = in[base + threadIdx.x];
  if (with_barrier) __syncthreads();
  out[base + threadIdx.x] = tile[blockDim.x - 1 - threadIdx.x];
}

__global__ void ballot_and_atomics(const int* flags, unsigned* ballots, int* counter) {
  const unsigned b = __ballot_sync(0xffffffffu, flags[threadIdx.x] != 0);
  if (threadIdx.x % 32 == 0) ballots[threadIdx.x / 32] = b;
  if (__any_sync(0xffffffffu, flags[threadIdx.x] != 0)) atomicAdd(counter, 1);
}

__global__ void half_roundtrip(const float* in, float* out) {
  const int i = threadIdx.x;
  out[2 * i] = __half2float(__float2half_rn(in[i]));
  out[2 * i + 1] = __bfloat162float(__float2bfloat16(in[i]));
}

// min/max overloads, __activemask after an early exit, double and 64-bit atomics, 64-bit shuffles.
__global__ void intrinsics(double* dsum, unsigned long long* usum, int* out) {
  if (threadIdx.x == 31) return;
  const unsigned active = __activemask();
  const long long wide = __shfl_sync(active, (long long)threadIdx.x << 40, 0);
  out[threadIdx.x] = min(int(threadIdx.x), 10) + max(int(threadIdx.x), 20) + (active == 0x7fffffffu ? 0 : 1000) +
                     (wide == 0 ? 0 : 2000);
  atomicAdd(dsum, 0.5);
  atomicAdd(usum, 1ull << 33);
}

// ---- broken kernels ------------------------------------------------------------------------------------

__global__ void divergent_barrier(float* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.f;
}

__global__ void barrier_after_early_exit(float* out) {
  if (threadIdx.x == 3) return;
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

__global__ void shuffle_outside_mask(float* out) {
  // Only the lower half participates, but lane 0 reads lane 20.
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0x0000ffffu, float(threadIdx.x), threadIdx.x == 0 ? 20 : 1);
}

__global__ void mask_with_exited_lane(float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, float(threadIdx.x), 1);
}

__global__ void mismatched_masks(float* out) {
  const unsigned mask = threadIdx.x == 7 ? 0x0000ffffu : 0xffffffffu;
  out[threadIdx.x] = __shfl_xor_sync(mask, float(threadIdx.x), 1);
}

__global__ void out_of_bounds_shared(float* out) {
  RK_DYNAMIC_SHARED(float, tile);
  tile[threadIdx.x] = 1.f;
  __syncthreads();
  out[threadIdx.x] = tile[threadIdx.x + 1];  // the last thread reads one past the allocation
}

__global__ void throws(float*) { throw std::runtime_error("thrown by kernel code"); }

// Uses the first and last word of its dynamic shared memory (64 KiB at the launches below).
__global__ void large_dynamic_smem(float* out) {
  RK_DYNAMIC_SHARED(float, tile);
  tile[threadIdx.x] = float(threadIdx.x);
  tile[16 * 1024 - 1 - threadIdx.x] = float(2 * threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = tile[31 - threadIdx.x] + tile[16 * 1024 - 32 + threadIdx.x];
}

// ---- driver --------------------------------------------------------------------------------------------

bool expect_error(const char* what, void (*launch)(), const char* needle, const char* file = "emu_selftest.cpp") {
  try {
    launch();
  } catch (const rk::emu::KernelError& e) {
    if (std::strstr(e.what(), needle) && std::strstr(e.what(), file)) {
      std::printf("OK caught: %s\n", e.what());
      return true;
    }
    if (std::strstr(e.what(), needle) && std::strcmp(needle, "threw") == 0) {
      std::printf("OK caught: %s\n", e.what());
      return true;
    }
    std::printf("FAIL %s: wrong error: %s\n", what, e.what());
    return false;
  }
  std::printf("FAIL %s: no error\n", what);
  return false;
}

// Heap buffers aligned to 256 bytes, so that sector counts do not depend on the allocator (global memory must not
// be a static array: the counters take the loaded objects' writable segments for static shared memory).
template <typename T>
T* aligned_buffer(size_t n, T fill) {
  T* p = static_cast<T*>(std::aligned_alloc(256, (n * sizeof(T) + 255) / 256 * 256));
  std::fill(p, p + n, fill);
  return p;
}

float* const g_out = aligned_buffer<float>(1024, 0.f);

uint16_t f16_bits(float x) { return __half_raw(__float2half_rn(x)).x; }
uint16_t bf16_bits(float x) { return __nv_bfloat16_raw(__float2bfloat16(x)).x; }

// D = A * B + C with small integers (every product and sum exact in fp32): any fragment-layout error changes D.
int mma_case(int kind) {
  const int K = kind == ptx_selftest::kMmaTF32 ? 8 : 16;
  std::mt19937 rng(7 + kind);
  std::uniform_int_distribution<int> small(-4, 4);
  std::vector<float> A(16 * K), B(8 * K), C(16 * 8), D(16 * 8, -1.f);
  for (float& v : A) v = float(small(rng));
  for (float& v : B) v = float(small(rng));  // stored [n][k]
  for (float& v : C) v = float(small(rng));
  std::vector<uint16_t> A16(A.size()), B16(B.size());
  for (size_t i = 0; i < A.size(); ++i) A16[i] = kind == ptx_selftest::kMmaF16 ? f16_bits(A[i]) : bf16_bits(A[i]);
  for (size_t i = 0; i < B.size(); ++i) B16[i] = kind == ptx_selftest::kMmaF16 ? f16_bits(B[i]) : bf16_bits(B[i]);
  const void* a = kind == ptx_selftest::kMmaTF32 ? static_cast<const void*>(A.data()) : A16.data();
  const void* b = kind == ptx_selftest::kMmaTF32 ? static_cast<const void*>(B.data()) : B16.data();
  if (kind == ptx_selftest::kMmaF16) rk::launch_kernel(ptx_selftest::mma_kernel<0>, dim3(1), dim3(32), 0, nullptr, a, b, C.data(), D.data());
  if (kind == ptx_selftest::kMmaBF16) rk::launch_kernel(ptx_selftest::mma_kernel<1>, dim3(1), dim3(32), 0, nullptr, a, b, C.data(), D.data());
  if (kind == ptx_selftest::kMmaTF32) rk::launch_kernel(ptx_selftest::mma_kernel<2>, dim3(1), dim3(32), 0, nullptr, a, b, C.data(), D.data());
  for (int m = 0; m < 16; ++m) {
    for (int n = 0; n < 8; ++n) {
      double ref = C[m * 8 + n];
      for (int k = 0; k < K; ++k) ref += double(A[m * K + k]) * B[n * K + k];
      if (D[m * 8 + n] != ref) return std::printf("FAIL mma D[%d][%d] = %g, expected %g\n", m, n, D[m * 8 + n], ref), 1;
    }
  }
  return std::printf("OK\n"), 0;
}

int mma_ldmatrix_case() {
  std::mt19937 rng(11);
  std::uniform_int_distribution<int> small(-4, 4);
  std::vector<float> A(256), B(128);
  for (float& v : A) v = float(small(rng));
  for (float& v : B) v = float(small(rng));  // [n][k]
  uint16_t* a = aligned_buffer<uint16_t>(256, 0);
  uint16_t* b = aligned_buffer<uint16_t>(128, 0);
  float* d = aligned_buffer<float>(128, -1.f);
  for (int i = 0; i < 256; ++i) a[i] = f16_bits(A[i]);
  for (int i = 0; i < 128; ++i) b[i] = f16_bits(B[i]);
  rk::launch_kernel(ptx_selftest::mma_ldmatrix_kernel, dim3(1), dim3(32), 384 * 2, nullptr,
                    static_cast<const uint16_t*>(a), static_cast<const uint16_t*>(b), d);
  int wrong = 0;
  for (int m = 0; m < 16; ++m) {
    for (int n = 0; n < 8; ++n) {
      double ref = 0;
      for (int k = 0; k < 16; ++k) ref += double(A[m * 16 + k]) * B[n * 16 + k];
      wrong += d[m * 8 + n] != ref;
    }
  }
  std::free(a);
  std::free(b);
  std::free(d);
  return wrong ? (std::printf("FAIL cp.async + ldmatrix + mma: %d wrong\n", wrong), 1) : (std::printf("OK\n"), 0);
}

// Matrix m's element (r, c) is m * 1000 + r * 16 + c; lane l must hold the documented pair in register m.
template <int Num, bool Trans>
int ldmatrix_case(int pitch) {
  std::vector<uint16_t> src(8 * Num * pitch, 0xdead);
  for (int m = 0; m < Num; ++m)
    for (int r = 0; r < 8; ++r)
      for (int c = 0; c < 8; ++c) src[(m * 8 + r) * pitch + c] = uint16_t(m * 1000 + r * 16 + c);
  std::vector<uint32_t> out(32 * Num, 0);
  rk::launch_kernel(ptx_selftest::ldmatrix_kernel<Num, Trans>, dim3(1), dim3(32), src.size() * 2, nullptr,
                    src.data(), pitch, out.data());
  for (int l = 0; l < 32; ++l) {
    for (int m = 0; m < Num; ++m) {
      const int a = l / 4, b = 2 * (l % 4);
      auto e = [&](int r, int c) { return uint32_t(m * 1000 + r * 16 + c); };
      const uint32_t expected = Trans ? e(b, a) | e(b + 1, a) << 16 : e(a, b) | e(a, b + 1) << 16;
      if (out[l * Num + m] != expected) {
        return std::printf("FAIL ldmatrix lane %d matrix %d: %08x, expected %08x\n", l, m, out[l * Num + m], expected), 1;
      }
    }
  }
  return std::printf("OK\n"), 0;
}

uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

int tf32_case() {
  const float tie = 1.0f + std::ldexp(1.0f, -11);  // halfway between two tf32 values: rounds away from zero
  std::vector<float> in(32, 0.f);
  in[0] = tie;
  in[1] = -tie;
  in[2] = std::nextafter(tie, 0.f);                 // just below the tie: down to 1
  in[3] = 3.0f;
  in[4] = INFINITY;
  in[5] = NAN;
  in[6] = 3.4028235e38f;                            // the largest float rounds up to infinity
  std::vector<uint32_t> out(32);
  rk::launch_kernel(ptx_selftest::tf32_kernel, dim3(1), dim3(32), 0, nullptr, in.data(), out.data());
  const uint32_t expected[7] = {bits_of(1.0f + std::ldexp(1.0f, -10)), bits_of(-(1.0f + std::ldexp(1.0f, -10))),
                                bits_of(1.0f), bits_of(3.0f), bits_of(INFINITY), 0x7fffffffu, bits_of(INFINITY)};
  for (int i = 0; i < 7; ++i) {
    if (out[i] != expected[i]) return std::printf("FAIL cvt.rna.tf32 [%d]: %08x, expected %08x\n", i, out[i], expected[i]), 1;
  }
  return std::printf("OK\n"), 0;
}

int cp_async_case(int mode, int n) {
  const int threads = 32;
  std::vector<float> src(4 * threads), dst(8 * threads, -1.f);
  for (int i = 0; i < 4 * threads; ++i) src[i] = float(i + 1);
  rk::launch_kernel(ptx_selftest::cp_async_kernel, dim3(1), dim3(threads), 8 * threads * sizeof(float), nullptr,
                    src.data(), n, dst.data(), mode);
  int wrong = 0, nans = 0;
  for (int i = 0; i < 4 * threads; ++i) {
    nans += std::isnan(dst[i]);
    wrong += dst[i] != (i < n ? src[i] : 0.f);
  }
  if (mode == 2) {
    for (int i = 0; i < threads; ++i)
      for (int j = 0; j < 4; ++j) wrong += dst[4 * threads + 4 * i + j] != (j == 1 ? 0.f : src[4 * i + j]);
  }
  if (mode == 1) {  // read before the wait: the tile still holds its poison
    return nans ? (std::printf("OK a read before cp.async.wait_group saw %d poisoned values\n", nans), 0)
                : (std::printf("FAIL a read before cp.async.wait_group went unnoticed\n"), 1);
  }
  return wrong ? (std::printf("FAIL cp.async: %d wrong\n", wrong), 1) : (std::printf("OK\n"), 0);
}

// Runs `launch` between profile_start and profile_stop and prints the launch records.
int profile_case(void (*launch)()) {
  rk::emu::profile_start();
  launch();
  const std::string json = rk::emu::profile_stop();
  if (!rk::emu::counters_built()) return std::printf("FAIL counters not built into this binary\n"), 1;
  return std::printf("OK %s\n", json.c_str()), 0;
}

float* const g_in = aligned_buffer<float>(4096, 1.f);
uint16_t* const g_in16 = aligned_buffer<uint16_t>(4096, 0);

int run_ptx_case(const std::string& name) {
  if (name == "mma_f16") return mma_case(ptx_selftest::kMmaF16);
  if (name == "mma_bf16") return mma_case(ptx_selftest::kMmaBF16);
  if (name == "mma_tf32") return mma_case(ptx_selftest::kMmaTF32);
  if (name == "tf32_round") return tf32_case();
  if (name == "mma_ldmatrix") return mma_ldmatrix_case();
  if (name == "ldmatrix_x1") return ldmatrix_case<1, false>(8);
  if (name == "ldmatrix_x2") return ldmatrix_case<2, false>(8);
  if (name == "ldmatrix_x4") return ldmatrix_case<4, false>(24);
  if (name == "ldmatrix_x1_trans") return ldmatrix_case<1, true>(8);
  if (name == "ldmatrix_x2_trans") return ldmatrix_case<2, true>(16);
  if (name == "ldmatrix_x4_trans") return ldmatrix_case<4, true>(8);
  if (name == "cp_async_zero_fill") return cp_async_case(0, 4 * 32 - 3 - 8);
  if (name == "cp_async_groups") return cp_async_case(2, 4 * 32);
  if (name == "cp_async_missing_wait") return cp_async_case(1, 4 * 32);
  static float* out = g_out;
  if (name == "mma_exited_lane")
    return expect_error(name.c_str(), [] { rk::launch_kernel(ptx_selftest::mma_exited_lane, dim3(1), dim3(32), 0, nullptr, out); },
                        "has exited", "ptx_kernels.cuh") ? 0 : 1;
  if (name == "mma_diverged")
    return expect_error(name.c_str(), [] { rk::launch_kernel(ptx_selftest::mma_diverged, dim3(1), dim3(32), 0, nullptr, out); },
                        "diverged", "ptx_kernels.cuh") ? 0 : 1;
  if (name == "ldmatrix_lane_missing")
    return expect_error(name.c_str(), [] { rk::launch_kernel(ptx_selftest::ldmatrix_lane_missing, dim3(1), dim3(32), 256, nullptr, out); },
                        "has exited", "ptx_kernels.cuh") ? 0 : 1;
  if (name == "ldmatrix_misaligned")
    return expect_error(name.c_str(), [] { rk::launch_kernel(ptx_selftest::ldmatrix_misaligned, dim3(1), dim3(32), 256, nullptr, out); },
                        "not 16-byte aligned", "ptx_kernels.cuh") ? 0 : 1;
  if (name == "ldmatrix_from_global")
    return expect_error(name.c_str(), [] { rk::launch_kernel(ptx_selftest::ldmatrix_from_global, dim3(1), dim3(32), 0, nullptr,
                                                              static_cast<const uint16_t*>(g_in16), out); },
                        "not in shared memory", "ptx_kernels.cuh") ? 0 : 1;
  if (name == "cp_async_never_waited")
    return expect_error(name.c_str(), [] { rk::launch_kernel(ptx_selftest::cp_async_never_waited, dim3(1), dim3(32), 512, nullptr,
                                                              static_cast<const float*>(g_in)); },
                        "never waited", "ptx_kernels.cuh") ? 0 : 1;
  if (name == "cp_async_to_global")
    return expect_error(name.c_str(), [] { rk::launch_kernel(ptx_selftest::cp_async_to_global, dim3(1), dim3(32), 0, nullptr,
                                                              static_cast<const float*>(g_in), out); },
                        "not in shared memory", "ptx_kernels.cuh") ? 0 : 1;
  if (name == "profile_patterns")
    return profile_case([] {
      static float4* in4 = aligned_buffer<float4>(32, make_float4(1, 2, 3, 4));
      static float4* out4 = aligned_buffer<float4>(32, make_float4(0, 0, 0, 0));
      rk::launch_kernel(ptx_selftest::counter_patterns, dim3(1), dim3(32), 1152 * sizeof(float), nullptr,
                        static_cast<const float*>(g_in), static_cast<const float4*>(in4), out, out4);
    });
  if (name == "profile_diverged")
    return profile_case([] {
      rk::launch_kernel(ptx_selftest::counter_diverged, dim3(1), dim3(32), 0, nullptr, static_cast<const float*>(g_in), out);
    });
  if (name == "profile_ptx")  // mma, ldmatrix with 16- and 64-byte row pitch, cp.async: one launch each
    return profile_case([] {
      static std::vector<float> C(128, 0.f), D(128);
      static std::vector<uint32_t> regs(128);
      rk::launch_kernel(ptx_selftest::mma_kernel<0>, dim3(1), dim3(32), 0, nullptr, static_cast<const void*>(g_in16),
                        static_cast<const void*>(g_in16), static_cast<const float*>(C.data()), D.data());
      rk::launch_kernel(ptx_selftest::ldmatrix_kernel<4, false>, dim3(1), dim3(32), 32 * 8 * 2, nullptr,
                        static_cast<const uint16_t*>(g_in16), 8, regs.data());
      rk::launch_kernel(ptx_selftest::ldmatrix_kernel<4, false>, dim3(1), dim3(32), 32 * 32 * 2, nullptr,
                        static_cast<const uint16_t*>(g_in16), 32, regs.data());
      rk::launch_kernel(ptx_selftest::cp_async_kernel, dim3(1), dim3(32), 256 * sizeof(float), nullptr,
                        static_cast<const float*>(g_in), 128, out, 0);
    });
  return -1;
}

int run_case(const std::string& name) {
  if (name == "block_sum") {
    const int n = 1000;
    std::vector<float> in(n), out(4);
    double expected = 0;
    for (int i = 0; i < n; ++i) expected += (in[i] = float(i % 7) - 3.f);
    rk::launch_kernel(block_sum, dim3(4), dim3(256), 0, nullptr, in.data(), out.data(), n);
    double got = out[0] + out[1] + out[2] + out[3];
    if (got != expected) return std::printf("FAIL block_sum %f != %f\n", got, expected), 1;
    return std::printf("OK sum %f\n", got), 0;
  }
  if (name == "reverse" || name == "missing_barrier") {
    std::vector<float> in(256), out(256);
    for (int i = 0; i < 256; ++i) in[i] = float(i);
    rk::launch_kernel(reverse_in_block, dim3(2), dim3(128), 128 * sizeof(float), nullptr, in.data(), out.data(),
                      name == "reverse");
    int wrong = 0, nans = 0;
    for (int b = 0; b < 2; ++b) {
      for (int t = 0; t < 128; ++t) {
        const float v = out[b * 128 + t];
        nans += std::isnan(v);
        wrong += v != in[b * 128 + 127 - t];
      }
    }
    if (name == "reverse") return wrong ? (std::printf("FAIL reverse: %d wrong\n", wrong), 1) : (std::printf("OK\n"), 0);
    // Without the barrier, threads read slots not yet written: poisoned NaN bytes show it.
    return nans ? (std::printf("OK missing barrier read %d poisoned values\n", nans), 0)
                : (std::printf("FAIL missing barrier went unnoticed\n"), 1);
  }
  if (name == "ballot_atomics") {
    std::vector<int> flags(64, 0);
    flags[3] = flags[40] = 1;
    std::vector<unsigned> ballots(2);
    int counter = 0;
    rk::launch_kernel(ballot_and_atomics, dim3(1), dim3(64), 0, nullptr, flags.data(), ballots.data(), &counter);
    const bool ok = ballots[0] == (1u << 3) && ballots[1] == (1u << 8) && counter == 64;
    return ok ? (std::printf("OK\n"), 0) : (std::printf("FAIL ballots %x %x counter %d\n", ballots[0], ballots[1], counter), 1);
  }
  if (name == "half") {
    std::vector<float> in{1.0f, 0.1f, -3.25f, 65504.f}, out(8);
    rk::launch_kernel(half_roundtrip, dim3(1), dim3(4), 0, nullptr, in.data(), out.data());
    const bool ok = out[0] == 1.0f && std::fabs(out[2] - 0.1f) < 1e-4f && out[4] == -3.25f && out[6] == 65504.f &&
                    std::fabs(out[3] - 0.1f) < 1e-3f && out[7] == 65536.f;
    return ok ? (std::printf("OK\n"), 0) : (std::printf("FAIL half/bfloat16 conversions\n"), 1);
  }
  if (name == "intrinsics") {
    double dsum = 0;
    unsigned long long usum = 0;
    std::vector<int> out(32, -1);
    rk::launch_kernel(intrinsics, dim3(1), dim3(32), 0, nullptr, &dsum, &usum, out.data());
    bool ok = dsum == 15.5 && usum == 31ull << 33 && out[31] == -1;
    for (int t = 0; t < 31; ++t) ok = ok && out[t] == std::min(t, 10) + std::max(t, 20);
    return ok ? (std::printf("OK\n"), 0) : (std::printf("FAIL intrinsics\n"), 1);
  }
  if (int rc = run_ptx_case(name); rc >= 0) return rc;
  float* o = g_out;
  static float* out_ptr;
  out_ptr = o;
  if (name == "divergent_barrier")
    return expect_error(name.c_str(), [] { rk::launch_kernel(divergent_barrier, dim3(1), dim3(32), 0, nullptr, out_ptr); },
                        "divergent __syncthreads") ? 0 : 1;
  if (name == "exited_barrier")
    return expect_error(name.c_str(), [] { rk::launch_kernel(barrier_after_early_exit, dim3(1), dim3(32), 0, nullptr, out_ptr); },
                        "exited") ? 0 : 1;
  if (name == "shuffle_outside_mask")
    return expect_error(name.c_str(), [] { rk::launch_kernel(shuffle_outside_mask, dim3(1), dim3(32), 0, nullptr, out_ptr); },
                        "outside the mask") ? 0 : 1;
  if (name == "exited_lane_in_mask")
    return expect_error(name.c_str(), [] { rk::launch_kernel(mask_with_exited_lane, dim3(1), dim3(32), 0, nullptr, out_ptr); },
                        "exited") ? 0 : 1;
  if (name == "mismatched_masks")
    return expect_error(name.c_str(), [] { rk::launch_kernel(mismatched_masks, dim3(1), dim3(32), 0, nullptr, out_ptr); },
                        "disagree") ? 0 : 1;
  if (name == "kernel_throws")
    return expect_error(name.c_str(), [] { rk::launch_kernel(throws, dim3(1), dim3(4), 0, nullptr, out_ptr); },
                        "threw") ? 0 : 1;
  if (name == "smem_limit_not_raised")  // more than 48 KiB without cudaFuncSetAttribute fails on a GPU
    return expect_error(name.c_str(), [] { rk::launch_kernel(large_dynamic_smem, dim3(1), dim3(32), 64 * 1024, nullptr,
                                                             out_ptr); },
                        "above the kernel's limit", "") ? 0 : 1;
  if (name == "smem_limit_raised") {
    rk::set_max_dynamic_smem(large_dynamic_smem, 64 * 1024);
    rk::launch_kernel(large_dynamic_smem, dim3(1), dim3(32), 64 * 1024, nullptr, out_ptr);
    bool ok = true;
    for (int t = 0; t < 32; ++t) ok = ok && out_ptr[t] == float(31 - t) + float(2 * (31 - t));
    const bool refused = expect_error("smem_limit_above_max", [] { rk::set_max_dynamic_smem(large_dynamic_smem, 228 * 1024); },
                                      "above the 227 KiB", "");
    return ok && refused ? (std::printf("OK\n"), 0) : (std::printf("FAIL smem_limit_raised\n"), 1);
  }
  if (name == "oob_shared") {  // only meaningful under AddressSanitizer: it must abort the process
    rk::launch_kernel(out_of_bounds_shared, dim3(1), dim3(32), 32 * sizeof(float), nullptr, out_ptr);
    std::printf("NOT CAUGHT\n");
    return 1;
  }
  std::printf("unknown case %s\n", name.c_str());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return std::printf("usage: emu_selftest <case> [forward|reverse|random] [seed]\n"), 2;
  const std::string order = argc > 2 ? argv[2] : "forward";
  const uint64_t seed = argc > 3 ? std::strtoull(argv[3], nullptr, 10) : 0;
  rk::emu::set_schedule(order == "reverse" ? rk::emu::BlockOrder::kReverse
                        : order == "random" ? rk::emu::BlockOrder::kRandom
                                            : rk::emu::BlockOrder::kForward,
                        seed);
  return run_case(argv[1]);
}
