// The generic path: the portable kernel (float64; CPUs without AVX2; widths that are not a multiple of the vector
// width), the same arithmetic as the vector paths with the accumulator in memory, compiled for AVX-512, AVX2 and
// baseline x86-64 with GCC's target_clones.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

#include "cpu/conv_kernels.h"

namespace rk {
namespace cpu {
namespace {

template <typename acc_t>
RK_ALWAYS_INLINE void axpy(acc_t* __restrict acc, acc_t a, const acc_t* __restrict w, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += a * w[i];
}

template <typename acc_t>
RK_ALWAYS_INLINE void fma_rows(acc_t* __restrict acc, const acc_t* __restrict x, const acc_t* __restrict w,
                               int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += x[i] * w[i];
}

// Computes output rows [row_begin, row_end) (row = n * OH + oh). `acc` and `ex` are the thread's scratch.
template <typename scalar_t, typename acc_t>
RK_ALWAYS_INLINE void conv_rows_impl(const ConvGeom& g, const Tiling& tl, const scalar_t* __restrict in,
                                     const acc_t* __restrict wp, const acc_t* __restrict shift,
                                     const int64_t* __restrict src_channel, scalar_t* __restrict out,
                                     const scalar_t* __restrict residual, bool relu,
                                     int64_t row_begin, int64_t row_end, acc_t* __restrict acc,
                                     acc_t* __restrict ex, acc_t* __restrict row_stats) {
  const int64_t C_in = g.C_in, C_out = g.C_out;
  const int64_t cpg_in = C_in / g.groups, cpg_out = C_out / g.groups;
  const int64_t tap_stride = cpg_in * C_out;  // wp elements per (kh, kw)
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t n = row / g.OH, oh = row % g.OH;
    const int64_t ih0 = oh * g.stride_h - g.pad_h;
    for (int64_t ow0 = 0; ow0 < g.OW; ow0 += tl.tile_ow) {
      const int64_t nt = std::min(tl.tile_ow, g.OW - ow0);
      const int64_t iw0 = ow0 * g.stride_w - g.pad_w;
      for (int64_t t = 0; t < nt; ++t) std::copy(shift, shift + C_out, acc + t * C_out);

      if (tl.expand) {
        // ex[kh][j][ci][co] = x[n, ih0 + kh*dil, iw0 + j, src_channel[co] + ci] for in-bounds columns j.
        for (int32_t kh = 0; kh < g.KH; ++kh) {
          const int64_t ih = ih0 + int64_t(kh) * g.dil_h;
          if (ih < 0 || ih >= g.H) continue;
          for (int64_t j = 0; j < tl.span; ++j) {
            const int64_t iw = iw0 + j;
            if (iw < 0 || iw >= g.W) continue;
            const scalar_t* px = in + ((n * g.H + ih) * g.W + iw) * C_in;
            acc_t* e = ex + (int64_t(kh) * tl.span + j) * tap_stride;
            for (int64_t ci = 0; ci < cpg_in; ++ci, e += C_out) {
              for (int64_t co = 0; co < C_out; ++co) e[co] = static_cast<acc_t>(px[src_channel[co] + ci]);
            }
          }
        }
      }

      for (int64_t t = 0; t < nt; ++t) {
        acc_t* a = acc + t * C_out;
        for (int32_t kh = 0; kh < g.KH; ++kh) {
          const int64_t ih = ih0 + int64_t(kh) * g.dil_h;
          if (ih < 0 || ih >= g.H) continue;
          for (int32_t kw = 0; kw < g.KW; ++kw) {
            const int64_t j = t * g.stride_w + int64_t(kw) * g.dil_w;
            const int64_t iw = iw0 + j;
            if (iw < 0 || iw >= g.W) continue;
            const acc_t* w = wp + (int64_t(kh) * g.KW + kw) * tap_stride;
            if (tl.expand) {
              const acc_t* e = ex + (int64_t(kh) * tl.span + j) * tap_stride;
              for (int64_t ci = 0; ci < cpg_in; ++ci) fma_rows(a, e + ci * C_out, w + ci * C_out, C_out);
            } else {
              const scalar_t* px = in + ((n * g.H + ih) * g.W + iw) * C_in;
              for (int64_t grp = 0; grp < g.groups; ++grp) {
                for (int64_t ci = 0; ci < cpg_in; ++ci) {
                  axpy(a + grp * cpg_out, static_cast<acc_t>(px[grp * cpg_in + ci]),
                       w + ci * C_out + grp * cpg_out, cpg_out);
                }
              }
            }
          }
        }
        const int64_t pixel = (n * g.OH + oh) * g.OW + ow0 + t;
        scalar_t* o = out + pixel * C_out;
        if (residual) {
          const scalar_t* res = residual + pixel * C_out;
          for (int64_t co = 0; co < C_out; ++co) a[co] += static_cast<acc_t>(res[co]);
        }
        if (relu) {
          for (int64_t co = 0; co < C_out; ++co) o[co] = static_cast<scalar_t>(a[co] < acc_t(0) ? acc_t(0) : a[co]);
        } else {
          for (int64_t co = 0; co < C_out; ++co) o[co] = static_cast<scalar_t>(a[co]);
        }
        if (row_stats) {  // as accumulate_row_stats_of (conv_problem.h): deviations from the row's first pixel
          acc_t* st = row_stats + row * 3 * C_out;
          const bool first = ow0 + t == 0;
          for (int64_t co = 0; co < C_out; ++co) {
            const acc_t v = static_cast<acc_t>(o[co]);
            if (first) st[co] = v;
            const acc_t d = v - st[co];
            st[C_out + co] = first ? d : st[C_out + co] + d;
            st[2 * C_out + co] = first ? d * d : st[2 * C_out + co] + d * d;
          }
        }
      }
    }
  }
}

// One ISA-dispatched entry point per dtype (target_clones needs plain functions).
#define RK_DEFINE_CONV_ROWS(NAME, scalar_t, acc_t)                                                          \
  RK_CPU_ISA_CLONES void NAME(const ConvGeom& g, const Tiling& tl, const scalar_t* in, const acc_t* wp,      \
                              const acc_t* shift, const int64_t* src_channel, scalar_t* out,                \
                              const scalar_t* residual, bool relu,                                          \
                              int64_t row_begin, int64_t row_end, acc_t* acc, acc_t* ex, acc_t* row_stats) { \
    conv_rows_impl<scalar_t, acc_t>(g, tl, in, wp, shift, src_channel, out, residual, relu, row_begin,    \
                                    row_end, acc, ex, row_stats);                                           \
  }
RK_DEFINE_CONV_ROWS(conv_rows, float, float)
RK_DEFINE_CONV_ROWS(conv_rows, double, double)
RK_DEFINE_CONV_ROWS(conv_rows, c10::BFloat16, float)
#undef RK_DEFINE_CONV_ROWS

template <typename scalar_t, typename acc_t>
void run(const ConvCall& c) {
  const ConvGeom& g = c.plan.geom;
  const Tiling& tl = c.plan.tiling;
  const at::Tensor shift = c.shift.contiguous();
  const acc_t* sh = shift.data_ptr<acc_t>();
  const std::vector<int64_t> src_channel = group_source_channels(g);
  const std::vector<acc_t> wp = pack_weight<scalar_t, acc_t>(g, c.weight, c.scale, c.plan.weight_block);
  const scalar_t* in = c.input.data_ptr<scalar_t>();
  scalar_t* out = c.out.data_ptr<scalar_t>();
  const scalar_t* residual = c.residual ? c.residual->data_ptr<scalar_t>() : nullptr;
  acc_t* row_stats = static_cast<acc_t*>(c.row_stats);
  at::parallel_for(0, g.N * g.OH, row_grain(g), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(tl.acc_size), ex(tl.expand_size);
    conv_rows(g, tl, in, wp.data(), sh, src_channel.data(), out, residual, c.relu, begin, end,
              acc.data(), ex.data(), row_stats);
  });
}

}  // namespace

void run_generic(const ConvCall& c) {
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, c.input.scalar_type(), "run_generic", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    run<scalar_t, acc_t>(c);
  });
}

}  // namespace cpu
}  // namespace rk
