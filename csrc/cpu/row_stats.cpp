// Row statistics (row_stats.h).
#include "cpu/row_stats.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu/isa.h"

namespace rk {
namespace cpu {
namespace {

// The row statistics the vector paths' epilogues compute (accumulate_row_stats_of, conv_problem.h), in one pass
// over a finished channels_last output: per output row and channel, the pivot (the row's first value), and the
// sums of the row's deviations from it and of their squares. Channels in blocks of kRowStatChannels, whose sums
// stay in registers over the row's pixels (each channel's summation order is the row's pixel order).
constexpr int64_t kRowStatChannels = 64;

// sum[c] += px[c] - p[c], sq[c] += (px[c] - p[c])^2 over a row's OW pixels, for nc (kFixed when > 0) channels.
template <int64_t kFixed, typename scalar_t>
RK_ALWAYS_INLINE void row_deviation_sums(const scalar_t* r, int64_t OW, int64_t C, int64_t nc_runtime,
                                         const float* __restrict p, float* __restrict sum, float* __restrict sq) {
  const int64_t nc = kFixed > 0 ? kFixed : nc_runtime;
  for (int64_t ow = 0; ow < OW; ++ow) {
    const scalar_t* __restrict px = r + ow * C;
#pragma omp simd
    for (int64_t c = 0; c < nc; ++c) {
      const float d = static_cast<float>(px[c]) - p[c];
      sum[c] += d;
      sq[c] += d * d;
    }
  }
}

template <typename scalar_t>
RK_ALWAYS_INLINE void fill_row_stats_rows_body(const scalar_t* y, int64_t OW, int64_t C, float* row_stats,
                                               int64_t r0, int64_t r1) {
  for (int64_t row = r0; row < r1; ++row) {
    const scalar_t* r = y + row * OW * C;
    float* pivot = row_stats + row * 3 * C;
    for (int64_t c0 = 0; c0 < C; c0 += kRowStatChannels) {
      const int64_t nc = std::min(kRowStatChannels, C - c0);
      float p[kRowStatChannels] = {}, sum[kRowStatChannels] = {}, sq[kRowStatChannels] = {};
      for (int64_t c = 0; c < nc; ++c) p[c] = static_cast<float>(r[c0 + c]);
      // a full block with a compile-time trip count: its sums live in vector registers
      if (nc == kRowStatChannels) row_deviation_sums<kRowStatChannels>(r + c0, OW, C, nc, p, sum, sq);
      else row_deviation_sums<0>(r + c0, OW, C, nc, p, sum, sq);
      std::copy(p, p + nc, pivot + c0);
      std::copy(sum, sum + nc, pivot + C + c0);
      std::copy(sq, sq + nc, pivot + 2 * C + c0);
    }
  }
}

// One entry point per dtype for AVX-512, AVX2 and baseline x86-64 (target_clones needs plain functions).
#define RK_DEFINE_FILL_ROW_STATS(scalar_t)                                                                      \
  RK_CPU_ISA_CLONES void fill_row_stats_rows(const scalar_t* y, int64_t OW, int64_t C, float* row_stats,        \
                                             int64_t r0, int64_t r1) {                                          \
    fill_row_stats_rows_body(y, OW, C, row_stats, r0, r1);                                                      \
  }
RK_DEFINE_FILL_ROW_STATS(float)
RK_DEFINE_FILL_ROW_STATS(double)
RK_DEFINE_FILL_ROW_STATS(c10::BFloat16)
#undef RK_DEFINE_FILL_ROW_STATS

template <typename scalar_t>
void fill_row_stats_typed(const ConvGeom& g, const at::Tensor& out, float* row_stats) {
  const scalar_t* y = out.data_ptr<scalar_t>();
  at::parallel_for(0, g.N * g.OH, 1, [&](int64_t begin, int64_t end) {
    fill_row_stats_rows(y, g.OW, g.C_out, row_stats, begin, end);
  });
}

// Batch mean and biased variance per channel from the conv epilogue's row statistics ([rows][pivot | sum of
// deviations | sum of squared deviations][C], rows of `width` pixels): each row's mean and sum of squared
// deviations, merged in row order with Chan's parallel formula in float64. Deterministic, and numerically safe:
// no E[y^2] - E[y]^2 over the batch (a row's sums are of deviations from one of its own values).
template <typename stat_t>
void merge_row_stats_typed(const stat_t* p, int64_t rows, int64_t C, int64_t width, int64_t M,
                           std::vector<double>& mean, std::vector<double>& var) {
  const double nb = double(width), inv_nb = 1.0 / nb;
  // Rows outer, channels inner (contiguous, vectorized); each channel's arithmetic is the same sequence as a loop
  // over rows for that channel alone. The per-row factors are hoisted out of the channel loop (divisions in it cost
  // as much as the batch's normalize pass at 7x7).
  at::parallel_for(0, C, 256, [&](int64_t c0, int64_t c1) {
    std::vector<double> mu(c1 - c0, 0.0), m2(c1 - c0, 0.0);
    double* __restrict mu_p = mu.data();
    double* __restrict m2_p = m2.data();
    double n = 0.0;
    for (int64_t r = 0; r < rows; ++r) {
      const stat_t* __restrict pivot = p + r * 3 * C + c0;
      const stat_t* __restrict sum = pivot + C;
      const stat_t* __restrict sq = sum + C;
      const double n_new = n + nb, f = nb / n_new, h = n * nb / n_new;
#pragma omp simd
      for (int64_t c = 0; c < c1 - c0; ++c) {
        const double s = double(sum[c]), mean_b = double(pivot[c]) + s * inv_nb;
        const double m2_b = std::max(0.0, double(sq[c]) - s * s * inv_nb);
        const double delta = mean_b - mu_p[c];
        mu_p[c] += delta * f;
        m2_p[c] += m2_b + delta * delta * h;
      }
      n = n_new;
    }
    for (int64_t c = c0; c < c1; ++c) {
      mean[c] = mu[c - c0];
      var[c] = m2[c - c0] / double(M);
    }
  });
}

}  // namespace

void fill_row_stats(const ConvGeom& g, const at::Tensor& out, float* row_stats) {
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, out.scalar_type(), "fill_row_stats", [&] {
    fill_row_stats_typed<scalar_t>(g, out, row_stats);
  });
}

void merge_row_stats(const at::Tensor& row_stats, int64_t width, int64_t M, std::vector<double>& mean,
                     std::vector<double>& var) {
  const at::Tensor st = row_stats.contiguous();
  const int64_t rows = st.size(0), C = st.size(2);
  if (st.scalar_type() == at::kDouble) merge_row_stats_typed(st.data_ptr<double>(), rows, C, width, M, mean, var);
  else merge_row_stats_typed(st.to(at::kFloat).data_ptr<float>(), rows, C, width, M, mean, var);
}

}  // namespace cpu
}  // namespace rk
