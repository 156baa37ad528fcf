// Self-tests of the CUDA-on-CPU emulator: correct kernels must give exact results under every schedule,
// and each class of bug a GPU would let slip must be caught. Torch-free; built and driven by
// tests/test_emulator.py. Usage: emu_selftest <case> [order] [seed]; prints "OK <detail>" or the error and
// exits 0 when the case behaved as expected, 1 otherwise.
#include "cuda/kernels/rk_launch.cuh"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

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

// ---- driver --------------------------------------------------------------------------------------------

bool expect_error(const char* what, void (*launch)(), const char* needle) {
  try {
    launch();
  } catch (const rk::emu::KernelError& e) {
    if (std::strstr(e.what(), needle) && std::strstr(e.what(), "emu_selftest.cpp")) {
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

std::vector<float> g_out(1024);

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
  float* o = g_out.data();
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
