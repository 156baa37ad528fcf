// The one seam between real CUDA and the CUDA-on-CPU emulator (csrc/emu).
//
// Kernel headers include this file and use only:
//   rk::launch_kernel(kernel, grid, block, dynamic_smem_bytes, stream, args...) -> cudaError_t
//   RK_DYNAMIC_SHARED(T, name);   // declares `T* name` pointing at the block's dynamic shared memory
//   rk::set_max_dynamic_smem(kernel, bytes) -> cudaError_t   // before launching with > 48 KiB of it
// Under nvcc they map onto <<<>>> and `extern __shared__`; with RK_EMULATOR defined (g++), onto the
// emulator, which runs every CUDA thread as a fiber. Host launchers therefore compute grid, block and
// shared-memory sizes with the same code in both builds.
#pragma once

#if defined(RK_EMULATOR)
#include "../../emu/emu_runtime.h"
#else
#include <cuda_runtime.h>
#include <utility>

namespace rk {
template <typename... KernelArgs, typename... Args>
inline cudaError_t launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t dynamic_smem,
                                 cudaStream_t stream, Args&&... args) {
  kernel<<<grid, block, dynamic_smem, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
}

// Lets `kernel` use more than 48 KiB of dynamic shared memory (a no-op in the emulator).
template <typename... KernelArgs>
inline cudaError_t set_max_dynamic_smem(void (*kernel)(KernelArgs...), size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}
}  // namespace rk

#define RK_DYNAMIC_SHARED(T, name)                                \
  extern __shared__ __align__(16) unsigned char rk_dynamic_smem_[]; \
  T* name = reinterpret_cast<T*>(rk_dynamic_smem_)
#endif
