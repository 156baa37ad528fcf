// CPU detection (isa.h).
#include "cpu/isa.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <string>

namespace rk {
namespace cpu {
namespace {

std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? std::string() : std::string(v);
}

CpuInfo detect() {
  CpuInfo info{CpuIsa::kBaseline, CpuIsa::kBaseline, CpuVendor::kOther, false};
#if RK_X86_DISPATCH
  __builtin_cpu_init();
  info.supported = __builtin_cpu_supports("x86-64-v4")   ? CpuIsa::kAvx512
                   : __builtin_cpu_supports("x86-64-v3") ? CpuIsa::kAvx2
                                                         : CpuIsa::kBaseline;
  info.vendor = __builtin_cpu_is("intel") ? CpuVendor::kIntel
                : __builtin_cpu_is("amd") ? CpuVendor::kAmd
                                          : CpuVendor::kOther;
  info.native_bf16 = __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
#endif
  info.isa = info.supported;
  const std::string cap = env("RESNEXT_KERNELS_CPU_ISA");
  if (cap == "avx2") {
    info.isa = std::min(info.isa, CpuIsa::kAvx2);
  } else if (cap == "baseline") {
    info.isa = CpuIsa::kBaseline;
  } else {
    TORCH_CHECK(cap.empty() || cap == "avx512",
                "RESNEXT_KERNELS_CPU_ISA must be one of avx512, avx2, baseline (or unset), got '", cap, "'");
  }
  const std::string vendor = env("RESNEXT_KERNELS_CPU_VENDOR");
  if (vendor == "intel") {
    info.vendor = CpuVendor::kIntel;
  } else if (vendor == "amd") {
    info.vendor = CpuVendor::kAmd;
  } else if (vendor == "other") {
    info.vendor = CpuVendor::kOther;
  } else {
    TORCH_CHECK(vendor.empty(), "RESNEXT_KERNELS_CPU_VENDOR must be one of intel, amd, other (or unset), got '",
                vendor, "'");
  }
  return info;
}

}  // namespace

const CpuInfo& cpu_info() {
  static const CpuInfo info = detect();
  return info;
}

const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

const char* vendor_name(CpuVendor vendor) {
  switch (vendor) {
    case CpuVendor::kIntel: return "intel";
    case CpuVendor::kAmd: return "amd";
    default: return "other";
  }
}

}  // namespace cpu
}  // namespace rk
