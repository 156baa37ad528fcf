// The CPU this process runs on, as the kernels see it: vector ISA, vendor and native bfloat16, detected once.
// The one detector of the project: the kernels dispatch on it, the planner (conv_plan.h) plans with it, and
// resnext_kernels.info / explain() read it through torch.ops.resnext_kernels._cpu_config.
//
// Environment (read once, at the first call; an unknown value is an error):
//   RESNEXT_KERNELS_CPU_ISA=avx2|baseline  caps the ISA below what the CPU has, so that one machine can test the
//                                          AVX2 and portable kernels too (avx512 or unset: no cap)
//   RESNEXT_KERNELS_CPU_VENDOR=intel|amd|other  the vendor the vendor-specific choices assume (tests only; unset:
//                                          detected)
#pragma once

#include <cstdint>

#define RK_ALWAYS_INLINE __attribute__((always_inline)) inline

// GCC on x86-64 Linux: per-ISA builds of the kernels (target attributes, target_clones) and run-time detection.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define RK_X86_DISPATCH 1
#else
#define RK_X86_DISPATCH 0
#endif

// Compiles a plain function for AVX-512, AVX2 and baseline x86-64, picked at load time (GCC's target_clones).
#if RK_X86_DISPATCH
#define RK_CPU_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RK_CPU_ISA_CLONES
#endif

// Calls NAME_avx512 or NAME_avx2 (a path's ISA entry points) for the detected ISA; callers have checked that a
// vector path applies, so a build without x86 dispatch never gets here.
#if RK_X86_DISPATCH
#define RK_CALL_FOR_ISA(NAME, ...) \
  (::rk::cpu::detected_isa() == ::rk::cpu::CpuIsa::kAvx512 ? NAME##_avx512(__VA_ARGS__) : NAME##_avx2(__VA_ARGS__))
#else
#define RK_CALL_FOR_ISA(NAME, ...) \
  TORCH_INTERNAL_ASSERT(false, "vector CPU path selected on a build without x86 dispatch")
#endif

namespace rk {
namespace cpu {

// x86-64-v4 (AVX-512 F/BW/CD/DQ/VL), x86-64-v3 (AVX2, FMA, BMI), or anything else.
enum class CpuIsa { kBaseline, kAvx2, kAvx512 };
enum class CpuVendor { kOther, kIntel, kAmd };

struct CpuInfo {
  CpuIsa isa;        // what the kernels run: `supported`, capped by RESNEXT_KERNELS_CPU_ISA
  CpuIsa supported;  // the best the CPU has
  CpuVendor vendor;
  bool native_bf16;  // AVX512_BF16 or AMX-BF16: bfloat16 multiplies in hardware
};

// Detected at the first call; throws (c10::Error) on an unknown RESNEXT_KERNELS_CPU_ISA or _VENDOR value.
const CpuInfo& cpu_info();

inline CpuIsa detected_isa() { return cpu_info().isa; }
inline bool cpu_is_intel() { return cpu_info().vendor == CpuVendor::kIntel; }

const char* isa_name(CpuIsa isa);        // "avx512", "avx2", "baseline"
const char* vendor_name(CpuVendor vendor);  // "intel", "amd", "other"

}  // namespace cpu
}  // namespace rk
