// CUDA-on-CPU emulator: the shim that lets g++ compile the project's CUDA kernel headers, and the runtime
// that executes them. Included through csrc/cuda/kernels/rk_launch.cuh when RK_EMULATOR is defined.
//
// Every CUDA thread of a block runs as a fiber (csrc/emu/emu_scheduler.cpp); blocks run one at a time, in
// the order the current schedule says. __syncthreads and the warp functions are scheduling points where
// the emulator checks that the block's threads agree (same barrier, same warp operation and mask); a
// violation raises rk::emu::KernelError naming the kernel source file and line. See docs/emulator.md.
#pragma once

// CUDA's headers define these only when they are undefined (crt/host_defines.h): defining them first makes
// vector_types.h, cuda_fp16.h and cuda_bf16.h usable from host code with host arithmetic. A kernel header
// may also have included a CUDA header first (host_defines.h then defined them for a host compiler); the
// #undefs make this header's definitions win either way. __noinline__ is deliberately left alone: libstdc++
// spells GCC's attribute __attribute__((__noinline__)), which a macro would break (write
// __attribute__((noinline)) in kernels instead; nvcc accepts it too).
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
// Blocks of one launch run one after another and launches are serialized process-wide (a mutex), so a
// function-local static is exactly one block's shared memory. Unlike dynamic shared memory it is not
// poisoned: a block sees what the previous block left there (zeros for the first block).
#define __shared__ static

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace rk {
namespace emu {

// A kernel broke a CUDA execution rule (divergent barrier, bad warp mask, deadlock, ...) or threw.
class KernelError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class BlockOrder { kForward, kReverse, kRandom };

// The schedule of the following launches (process-wide): the order blocks run in, and the seed of the
// random choices (block order for kRandom; which ready thread runs next, for every order but kForward).
void set_schedule(BlockOrder order, uint64_t seed);
BlockOrder schedule_order();
uint64_t schedule_seed();

struct LaunchStats {
  uint64_t launches, blocks, threads, barriers, warp_ops;
};
LaunchStats launch_stats();

// The running fiber's CUDA built-ins, returned by value: reading them is no memory access of the kernel (the
// counters see none, as on a GPU, where they are special registers).
uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();
void* dynamic_smem();

// Scheduling points, called by the macros below with the kernel source location.
void syncthreads(const char* file, int line);
// kActiveMask (__activemask) completes once the block is quiescent; its result is the set of the warp's
// lanes waiting at that same call site, i.e. lanes that exited or wait anywhere else count as diverged.
// kCollective is a warp-collective instruction of ptx.cuh (mma.sync, ldmatrix): every lane of the warp must
// arrive at the same call site with the same instruction (`value`) and variant (`param`); `payload` points at
// the lane's operands, which the scheduler reads and overwrites with the lane's results.
enum class WarpOp { kShfl, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kSync, kActiveMask, kCollective };
uint64_t warp_exchange(WarpOp op, unsigned mask, uint64_t value, int param, int width, const char* file, int line,
                       void* payload = nullptr);

// Runs `body` (the kernel with its arguments bound) for every thread of the grid. `kernel` identifies the kernel
// for the counters (its symbol names the launch record); [params, params + param_bytes) is the copy of the
// kernel arguments, which the kernel may read without it being a memory access. Throws KernelError.
// As on a GPU, a launch with more than 48 KiB of dynamic shared memory fails unless the kernel's limit was raised
// to at least that (cudaFuncAttributeMaxDynamicSharedMemorySize); no kernel gets more than 227 KiB.
void run_grid(const std::function<void()>& body, dim3 grid, dim3 block, size_t dynamic_smem_bytes,
              const void* kernel = nullptr, const void* params = nullptr, size_t param_bytes = 0);
void raise_dynamic_smem_limit(const void* kernel, size_t bytes);  // throws KernelError above 227 KiB

// ---- tensor-core and asynchronous-copy instructions (csrc/cuda/kernels/ptx.cuh; csrc/emu/emu_ptx.cpp) ----
enum class Collective : int { kMmaF16 = 0, kMmaBF16 = 1, kMmaTF32 = 2, kLdmatrix = 3 };
// A lane's operands and result of mma.sync (a and b as the PTX registers hold them, c and d as fp32).
struct MmaOperands {
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
  float d[4];
};
// A lane's row address (lanes 0-7 give matrix 0's rows, 8-15 matrix 1's, ...) and its result registers.
struct LdmatrixOperands {
  const void* row;
  uint32_t r[4];
};
// cp.async of cp_size bytes (4, 8 or 16; .cg only 16): src_size bytes are read from global memory now, and land
// in shared memory, zero-filled to cp_size, at the cp.async.wait_group that covers them.
void cp_async(void* smem_dst, const void* gmem_src, int cp_size, int src_size, bool cache_global, const char* file,
              int line);
void cp_async_commit(const char* file, int line);
// Waits until at most `pending` of the thread's committed groups are outstanding (wait_all: commit, then 0).
void cp_async_wait(int pending, const char* file, int line);

// ---- counters (csrc/emu/emu_counters.cpp) ---------------------------------------------------------------
// Between profile_start() and profile_stop(), every launch is counted: the kernels' memory accesses (seen
// through the -fsanitize=thread hooks the instrumented build calls), grouped into warp instructions, and the
// collective instructions. profile_stop() returns one JSON object per launch. counters_built() tells whether
// this build's kernels are instrumented (not in the AddressSanitizer build).
bool counters_built();
void profile_start();
std::string profile_stop();

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "warp value too large");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <typename T>
inline T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

}  // namespace emu

template <typename... KernelArgs, typename... Args>
inline cudaError_t launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t dynamic_smem,
                                 cudaStream_t /*stream*/, Args&&... args) {
  std::tuple<std::decay_t<KernelArgs>...> bound(std::forward<Args>(args)...);  // copied like a real launch
  emu::run_grid([&] { std::apply(kernel, bound); }, grid, block, dynamic_smem, reinterpret_cast<const void*>(kernel),
                &bound, sizeof(bound));
  return cudaSuccess;
}

template <typename... KernelArgs>
inline cudaError_t set_max_dynamic_smem(void (*kernel)(KernelArgs...), size_t bytes) {
  emu::raise_dynamic_smem_limit(reinterpret_cast<const void*>(kernel), bytes);
  return cudaSuccess;
}

}  // namespace rk

inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated CUDA error"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

#define threadIdx (::rk::emu::thread_idx())
#define blockIdx (::rk::emu::block_idx())
#define blockDim (::rk::emu::block_dim())
#define gridDim (::rk::emu::grid_dim())
constexpr int warpSize = 32;

#define RK_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::rk::emu::dynamic_smem())

#define __syncthreads() ::rk::emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::rk::emu::detail_syncwarp(__FILE__, __LINE__, ##__VA_ARGS__)
#define __shfl_sync(mask, v, lane, ...) ::rk::emu::detail_shfl(::rk::emu::WarpOp::kShfl, mask, v, lane, __FILE__, __LINE__, ##__VA_ARGS__)
#define __shfl_up_sync(mask, v, d, ...) ::rk::emu::detail_shfl(::rk::emu::WarpOp::kShflUp, mask, v, d, __FILE__, __LINE__, ##__VA_ARGS__)
#define __shfl_down_sync(mask, v, d, ...) ::rk::emu::detail_shfl(::rk::emu::WarpOp::kShflDown, mask, v, d, __FILE__, __LINE__, ##__VA_ARGS__)
#define __shfl_xor_sync(mask, v, m, ...) ::rk::emu::detail_shfl(::rk::emu::WarpOp::kShflXor, mask, v, m, __FILE__, __LINE__, ##__VA_ARGS__)
#define __ballot_sync(mask, p) static_cast<unsigned>(::rk::emu::warp_exchange(::rk::emu::WarpOp::kBallot, mask, (p) ? 1 : 0, 0, 32, __FILE__, __LINE__))
#define __any_sync(mask, p) static_cast<int>(::rk::emu::warp_exchange(::rk::emu::WarpOp::kAny, mask, (p) ? 1 : 0, 0, 32, __FILE__, __LINE__))
#define __activemask() static_cast<unsigned>(::rk::emu::warp_exchange(::rk::emu::WarpOp::kActiveMask, 0, 0, 0, 32, __FILE__, __LINE__))
#define __all_sync(mask, p) static_cast<int>(::rk::emu::warp_exchange(::rk::emu::WarpOp::kAll, mask, (p) ? 1 : 0, 0, 32, __FILE__, __LINE__))

namespace rk {
namespace emu {
inline void detail_syncwarp(const char* file, int line, unsigned mask = 0xffffffffu) {
  warp_exchange(WarpOp::kSync, mask, 0, 0, 32, file, line);
}
template <typename T>
inline T detail_shfl(WarpOp op, unsigned mask, T v, int param, const char* file, int line, int width = 32) {
  return from_bits<T>(warp_exchange(op, mask, to_bits(v), param, width, file, line));
}
}  // namespace emu
}  // namespace rk

// Memory operations: fibers never interleave inside a statement, so atomics are plain read-modify-writes.
template <typename T>
inline T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
template <typename T>
inline T atomicMax(T* address, T value) {
  const T old = *address;
  *address = old < value ? value : old;
  return old;
}
template <typename T>
inline T atomicCAS(T* address, T compare, T value) {
  const T old = *address;
  if (old == compare) *address = value;
  return old;
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
// The cache-hinted store (sm_32_intrinsics.h) that keeps a 16-byte vector store one instruction under nvcc.
template <typename T>
inline void __stwb(T* p, T value) {
  *p = value;
}
inline void __threadfence() {}
inline void __threadfence_block() {}
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline int __float2int_rn(float x) { return static_cast<int>(std::nearbyint(x)); }

// CUDA's device-side min/max overloads (global namespace); mixed signed/unsigned arguments are not supported.
#define RK_EMU_MINMAX(T)                                   \
  inline T min(T a, T b) { return b < a ? b : a; }        \
  inline T max(T a, T b) { return a < b ? b : a; }
RK_EMU_MINMAX(int)
RK_EMU_MINMAX(unsigned)
RK_EMU_MINMAX(long)
RK_EMU_MINMAX(unsigned long)
RK_EMU_MINMAX(long long)
RK_EMU_MINMAX(unsigned long long)
RK_EMU_MINMAX(float)
RK_EMU_MINMAX(double)
#undef RK_EMU_MINMAX
