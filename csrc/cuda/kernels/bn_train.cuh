// CUDA kernels of the training form of the fused op: batch statistics of the conv output, normalization +
// ReLU, and the BatchNorm + ReLU backward. Device code only, torch-free (compiled by nvcc and the emulator).
//
// Data: y, grad are NHWC, viewed as M = N*OH*OW rows of C channels.
// Reductions are deterministic: channel_partials gives one partial per (fixed block of kStatRows rows,
// channel), each thread owning one channel of one block, so consecutive threads read consecutive
// addresses; channel_finalize then merges a channel's partials in block order in float64. No atomics:
// results are bitwise reproducible and independent of the launch order of blocks.
#pragma once

#include <stdint.h>

#include "conv_bn_relu_fwd.cuh"

namespace rk {
namespace cuda_kernels {

constexpr int kStatRows = 256;
constexpr int kStatThreads = 256;

enum class Partial : int { kSum = 0, kSquaredDeviation = 1, kBackward = 2 };

// partial[(block * width + k) * C + c] for k < width (width 1, or 2 for kBackward: sum g, sum g*(y - mean)).
template <typename T, typename Acc>
__global__ void __launch_bounds__(kStatThreads)
    channel_partials_kernel(const T* __restrict__ y, const T* __restrict__ grad, const Acc* __restrict__ mean,
                            const Acc* __restrict__ a, const Acc* __restrict__ b, int64_t M, int64_t C,
                            Partial what, bool relu, Acc* __restrict__ partial) {
  const int64_t c = int64_t(blockIdx.y) * kStatThreads + threadIdx.x;
  if (c >= C) return;  // no barrier in this kernel
  const int64_t r0 = int64_t(blockIdx.x) * kStatRows;
  const int64_t r1 = r0 + kStatRows < M ? r0 + kStatRows : M;
  Acc s0 = Acc(0), s1 = Acc(0);
  for (int64_t r = r0; r < r1; ++r) {
    const Acc v = Acc(to_acc(y[r * C + c]));
    if (what == Partial::kSum) {
      s0 += v;
    } else if (what == Partial::kSquaredDeviation) {
      const Acc d = v - mean[c];
      s0 += d * d;
    } else {
      Acc g = Acc(to_acc(grad[r * C + c]));
      if (relu && !(v * a[c] + b[c] > Acc(0))) g = Acc(0);  // the forward's ReLU mask, recomputed exactly
      s0 += g;
      s1 += g * (v - mean[c]);
    }
  }
  const int width = what == Partial::kBackward ? 2 : 1;
  partial[(int64_t(blockIdx.x) * width) * C + c] = s0;
  if (width == 2) partial[(int64_t(blockIdx.x) * width + 1) * C + c] = s1;
}

// What channel_finalize computes from the merged sums.
enum class Finalize : int { kMean = 0, kVariance = 1, kAffine = 2, kBackward = 3 };

// The normalization's affine map from the stored (rounded) statistics, so that forward and backward compute
// bit-identical (a, b) and hence the same ReLU mask.
template <typename Acc>
__host__ __device__ inline void bn_affine(Acc mean, Acc var, const Acc* gamma, const Acc* beta, int64_t c, double eps,
                                          Acc* a, Acc* b) {
  const double scale = (gamma ? double(gamma[c]) : 1.0) / sqrt(double(var) + eps);
  a[c] = Acc(scale);
  b[c] = Acc((beta ? double(beta[c]) : 0.0) - double(mean) * scale);
}

// One thread per channel; a channel's partials are merged in block order in float64.
//   kMean:     mean = sum / M
//   kVariance: var = sum / M, then (a, b)
//   kAffine:   (a, b) from the given mean and var (no partials)
//   kBackward: grad_beta = sum g, grad_gamma = sum g * xhat, and k1, k2, k3 of
//              grad_y = k1 * g - k2 - k3 * (y - mean)
template <typename Acc>
__global__ void channel_finalize_kernel(const Acc* __restrict__ partial, int64_t nblocks, int64_t M, int64_t C,
                                        Finalize what, double eps, const Acc* __restrict__ gamma,
                                        const Acc* __restrict__ beta, Acc* __restrict__ mean, Acc* __restrict__ var,
                                        Acc* __restrict__ a, Acc* __restrict__ b, Acc* __restrict__ k1,
                                        Acc* __restrict__ k2, Acc* __restrict__ k3, Acc* __restrict__ grad_gamma,
                                        Acc* __restrict__ grad_beta) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  if (what == Finalize::kAffine) {
    bn_affine(mean[c], var[c], gamma, beta, c, eps, a, b);
    return;
  }
  const int width = what == Finalize::kBackward ? 2 : 1;
  double s0 = 0.0, s1 = 0.0;
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    s0 += double(partial[(blk * width) * C + c]);
    if (width == 2) s1 += double(partial[(blk * width + 1) * C + c]);
  }
  if (what == Finalize::kMean) {
    mean[c] = Acc(s0 / double(M));
  } else if (what == Finalize::kVariance) {
    var[c] = Acc(s0 / double(M));
    bn_affine(mean[c], var[c], gamma, beta, c, eps, a, b);
  } else {
    const double invstd = 1.0 / sqrt(double(var[c]) + eps);
    const double s = (gamma ? double(gamma[c]) : 1.0) * invstd;
    grad_beta[c] = Acc(s0);
    grad_gamma[c] = Acc(s1 * invstd);
    k1[c] = Acc(s);
    k2[c] = Acc(s * s0 / double(M));
    k3[c] = Acc(s * s1 / double(M) * invstd * invstd);
  }
}

// out = relu?(y * a + b) over M x C (NaN passes the ReLU, as torch.relu).
template <typename T, typename Acc>
__global__ void normalize_relu_kernel(const T* __restrict__ y, const Acc* __restrict__ a, const Acc* __restrict__ b,
                                      int64_t M, int64_t C, bool relu, T* __restrict__ out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M * C) return;
  const int64_t c = i % C;
  Acc z = Acc(to_acc(y[i])) * a[c] + b[c];
  if (relu && z < Acc(0)) z = Acc(0);
  out[i] = from_acc<T, Acc>(z);
}

// grad_y = k1 * g - k2 - k3 * (y - mean), g = grad masked by the forward's ReLU.
template <typename T, typename Acc>
__global__ void bn_relu_backward_kernel(const T* __restrict__ y, const T* __restrict__ grad, const Acc* __restrict__ mean,
                                        const Acc* __restrict__ a, const Acc* __restrict__ b, const Acc* __restrict__ k1,
                                        const Acc* __restrict__ k2, const Acc* __restrict__ k3, int64_t M, int64_t C,
                                        bool relu, T* __restrict__ grad_y) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M * C) return;
  const int64_t c = i % C;
  const Acc v = Acc(to_acc(y[i]));
  Acc g = Acc(to_acc(grad[i]));
  if (relu && !(v * a[c] + b[c] > Acc(0))) g = Acc(0);
  grad_y[i] = from_acc<T, Acc>(k1[c] * g - k2[c] - k3[c] * (v - mean[c]));
}

}  // namespace cuda_kernels
}  // namespace rk
