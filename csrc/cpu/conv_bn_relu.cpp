// CPU kernel of conv_bn_relu_infer: grouped KxK convolution + folded BatchNorm + optional ReLU in one
// pass over NHWC data.
//
// How it works
//   * The weight is packed once per call into wp[kh][kw][ci][co] (ci local to the group, co over all
//     output channels) in the accumulation type, with the BN scale folded in; the accumulator of an
//     output pixel starts at the BN shift, so the epilogue is only the optional ReLU and the store.
//   * Work items are output rows (n, oh), split across threads by at::parallel_for; a row is processed
//     in column tiles sized so that a thread's scratch stays cache-sized.
//   * Winograd path (conv_winograd.h): 3x3, stride 1, dilation 1, 8-64 channels per group in and out, no residual,
//     as F(2x2, 3x3) or F(4x4, 3x3) with 2.25x or 4x fewer multiply-adds; it takes precedence over the below.
//   * Channel-lane path (conv_lanes.h): groups of 2, 4 or 8 channels in and out with a 3-wide kernel put input
//     channels in the vector lanes and reorder the sums per output pixel; it takes precedence over the below.
//   * Dense 1x1 convolutions with >= kPointwiseWeightBytesForAten of weights, on AVX2 broadcast-path convolutions
//     with > kBroadcastBlockWeightBytesForAten of weights per channel block, and on Intel AVX-512 CPUs all
//     broadcast-path convolutions go to ATen (oneDNN), BN folded (conv_runs_on_aten).
//   * Otherwise vectorization runs across output channels (contiguous in NHWC and in wp), in one of two ways:
//       broadcast: when a group has >= kBroadcastMinWidth output channels (dense and wide groups), each
//                  input value is broadcast and multiplied into its group's slice of the accumulator;
//       expand:    when groups are narrow and the lane path does not apply (depthwise, 3 per group), the input
//                  columns of the tile are first expanded to e[ci][co] = x[group(co) * cpg_in + ci], so
//                  that the inner loop runs over all C_out channels with no per-group bookkeeping.
//   * Blocked path (float32/bfloat16 on AVX-512 or AVX2 machines, block widths a multiple of the vector
//     width): a microkernel keeps TP output pixels x NV vectors of output channels in registers over all
//     taps and input channels (GCC vector extensions; TP*NV is sized to the ISA's register file), so each
//     multiply-add costs at most one load. Expanded input rows are cached per thread and reused by the
//     next output rows (stride 1 reads each input row KH times).
//   * Generic path (float64, baseline CPUs, other widths): the same arithmetic with the accumulator in
//     memory, compiled for AVX-512 / AVX2 / baseline with GCC's target_clones.
//   * Optionally a residual tensor (same shape as the output) is added before the ReLU, which fuses a
//     bottleneck's "+ shortcut, ReLU" into its last convolution.
// Runtime ISA dispatch: __builtin_cpu_supports picks the AVX-512 (x86-64-v4) or AVX2 (x86-64-v3) build of
// the blocked path once per process. Accumulation is float for float32/bfloat16 and double for float64.
// All indexing is 64-bit.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "common/conv_checks.h"
#include "common/path_scope.h"
#include "cpu/conv_blocked.h"
#include "cpu/conv_lanes.h"
#include "cpu/conv_winograd.h"
#include "cpu/conv_cpu.h"
#include "cpu/conv_plan.h"


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
        if (row_stats) {  // as accumulate_row_stats (conv_blocked.h): deviations from the row's first pixel
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

#if RK_X86_DISPATCH
// One entry point per (ISA, dtype); the always_inline templates below them get each ISA's code.
#define RK_DEFINE_BLOCKED(NAME, TARGET, VEC, scalar_t)                                                     \
  __attribute__((target(TARGET))) void NAME(const BlockedProblem<scalar_t>& P, BlockedScratch& S, int nv, \
                                            int64_t row_begin, int64_t row_end) {                        \
    blocked_rows_dispatch<VEC>(P, S, nv, row_begin, row_end);                                            \
  }
RK_DEFINE_BLOCKED(blocked_rows_avx512, "arch=x86-64-v4", Avx512Vec, float)
RK_DEFINE_BLOCKED(blocked_rows_avx512, "arch=x86-64-v4", Avx512Vec, c10::BFloat16)
RK_DEFINE_BLOCKED(blocked_rows_avx2, "arch=x86-64-v3", Avx2Vec, float)
RK_DEFINE_BLOCKED(blocked_rows_avx2, "arch=x86-64-v3", Avx2Vec, c10::BFloat16)
#undef RK_DEFINE_BLOCKED

#define RK_DEFINE_LANES(NAME, TARGET, VEC, scalar_t)                                                       \
  __attribute__((target(TARGET))) void NAME(const BlockedProblem<scalar_t>& P, const scalar_t** tbl, int c, \
                                            int64_t row_begin, int64_t row_end) {                        \
    lane_rows_dispatch<VEC>(P, tbl, c, row_begin, row_end);                                              \
  }
RK_DEFINE_LANES(lane_rows_avx512, "arch=x86-64-v4", Avx512Vec, float)
RK_DEFINE_LANES(lane_rows_avx512, "arch=x86-64-v4", Avx512Vec, c10::BFloat16)
RK_DEFINE_LANES(lane_rows_avx2, "arch=x86-64-v3", Avx2Vec, float)
RK_DEFINE_LANES(lane_rows_avx2, "arch=x86-64-v3", Avx2Vec, c10::BFloat16)
#undef RK_DEFINE_LANES

// Winograd entry points: `lanes` is the transform vector width and `tile` the output tile size (2 or 4) that
// winograd_plan picked, cpg the channels per group.
#define RK_WINOGRAD_CASE(F, VT, VG, CPG) \
  case CPG: return winograd_items<F, VT, VG, CPG>(P, W, vbuf, mbuf, ubuf, begin, end);
#define RK_WINOGRAD_SWITCH(NAME, F, VT, VG8, VG)                                \
  switch (cpg) {                                                                \
    RK_WINOGRAD_CASE(F, VT, VG8, 8)                                             \
    RK_WINOGRAD_CASE(F, VT, VG, 16)                                             \
    RK_WINOGRAD_CASE(F, VT, VG, 32)                                             \
    RK_WINOGRAD_CASE(F, VT, VG, 64)                                             \
    default: TORCH_INTERNAL_ASSERT(false, NAME ": unexpected channels per group ", cpg); \
  }
template <typename scalar_t>
__attribute__((target("arch=x86-64-v4"))) void winograd_items_avx512(const BlockedProblem<scalar_t>& P,
                                                                     const WinogradWeights<scalar_t>& W, float* vbuf,
                                                                     float* mbuf, float* ubuf, int lanes, int tile,
                                                                     int cpg, int64_t begin, int64_t end) {
  if (tile == 4) {
    if (lanes == 8) return winograd_items<WinogradF4, Avx512YmmVec, Avx512YmmVec, 8>(P, W, vbuf, mbuf, ubuf, begin, end);
    RK_WINOGRAD_SWITCH("winograd_items_avx512", WinogradF4, Avx512Vec, Avx512YmmVec, Avx512Vec)
  }
  if (lanes == 8) return winograd_items<WinogradF2, Avx512YmmVec, Avx512YmmVec, 8>(P, W, vbuf, mbuf, ubuf, begin, end);
  RK_WINOGRAD_SWITCH("winograd_items_avx512", WinogradF2, Avx512Vec, Avx512YmmVec, Avx512Vec)
}
template <typename scalar_t>
__attribute__((target("arch=x86-64-v3"))) void winograd_items_avx2(const BlockedProblem<scalar_t>& P,
                                                                   const WinogradWeights<scalar_t>& W, float* vbuf,
                                                                   float* mbuf, float* ubuf, int /*lanes*/, int tile,
                                                                   int cpg, int64_t begin, int64_t end) {
  if (tile == 4) RK_WINOGRAD_SWITCH("winograd_items_avx2", WinogradF4, Avx2Vec, Avx2Vec, Avx2Vec)
  RK_WINOGRAD_SWITCH("winograd_items_avx2", WinogradF2, Avx2Vec, Avx2Vec, Avx2Vec)
}
#undef RK_WINOGRAD_CASE
// The weight transform of all blocks in [b0, b1) (image-major order; see WinogradWeights), with the vectors that
// winograd_items's transforms and GEMMs use.
#define RK_WINOGRAD_CASE(F, VT, VG, CPG) \
  case CPG: return winograd_pack_ublocks<F, VT, VG, CPG>(a, b0, b1, u);
template <typename scalar_t>
__attribute__((target("arch=x86-64-v4"))) void winograd_pack_avx512(const WinogradPackArgs<scalar_t>& a, int lanes,
                                                                    int tile, int cpg, int64_t b0, int64_t b1,
                                                                    float* u) {
  if (tile == 4) {
    if (lanes == 8) return winograd_pack_ublocks<WinogradF4, Avx512YmmVec, Avx512YmmVec, 8>(a, b0, b1, u);
    RK_WINOGRAD_SWITCH("winograd_pack_avx512", WinogradF4, Avx512Vec, Avx512YmmVec, Avx512Vec)
  }
  if (lanes == 8) return winograd_pack_ublocks<WinogradF2, Avx512YmmVec, Avx512YmmVec, 8>(a, b0, b1, u);
  RK_WINOGRAD_SWITCH("winograd_pack_avx512", WinogradF2, Avx512Vec, Avx512YmmVec, Avx512Vec)
}
template <typename scalar_t>
__attribute__((target("arch=x86-64-v3"))) void winograd_pack_avx2(const WinogradPackArgs<scalar_t>& a, int /*lanes*/,
                                                                  int tile, int cpg, int64_t b0, int64_t b1,
                                                                  float* u) {
  if (tile == 4) RK_WINOGRAD_SWITCH("winograd_pack_avx2", WinogradF4, Avx2Vec, Avx2Vec, Avx2Vec)
  RK_WINOGRAD_SWITCH("winograd_pack_avx2", WinogradF2, Avx2Vec, Avx2Vec, Avx2Vec)
}
#undef RK_WINOGRAD_SWITCH
#undef RK_WINOGRAD_CASE
#endif

// Calls NAME_avx512 or NAME_avx2 (the entry points above) for the detected ISA; callers have checked that a vector
// path applies, so a build without x86 dispatch never gets here.
#if RK_X86_DISPATCH
#define RK_CALL_FOR_ISA(NAME, ...) \
  (detected_isa() == CpuIsa::kAvx512 ? NAME##_avx512(__VA_ARGS__) : NAME##_avx2(__VA_ARGS__))
#else
#define RK_CALL_FOR_ISA(NAME, ...) TORCH_INTERNAL_ASSERT(false, "vector CPU path selected on a build without x86 dispatch")
#endif

// wl[cb][kh][kw][j][lane] = weight[co][ci][kh][kw] * scale[co] for channel cb * L + lane = group * c + ci and
// co = group * c + j.
template <typename scalar_t>
std::vector<float> pack_lane_weight(const ConvGeom& g, const at::Tensor& weight, const at::Tensor& scale, int L) {
  const at::Tensor w = weight.contiguous();
  const at::Tensor s = scale.contiguous();
  const scalar_t* wsrc = w.data_ptr<scalar_t>();
  const float* sc = s.data_ptr<float>();
  const int64_t c = g.C_in / g.groups, khw = int64_t(g.KH) * g.KW;
  std::vector<float> wl(khw * c * g.C_in);
  for (int64_t cb = 0; cb < g.C_in / L; ++cb) {
    for (int64_t k = 0; k < khw; ++k) {
      for (int64_t j = 0; j < c; ++j) {
        float* dst = wl.data() + ((cb * khw + k) * c + j) * L;
        for (int64_t l = 0; l < L; ++l) {
          const int64_t ch = cb * L + l, co = (ch / c) * c + j, ci = ch % c;
          dst[l] = static_cast<float>(wsrc[(co * c + ci) * khw + k]) * sc[co];
        }
      }
    }
  }
  return wl;
}

// wp[co / B][kh][kw][ci][co % B] = weight[co][ci][kh][kw] * scale[co], in the accumulation type, for blocks of B
// output channels (B = C_out: one row (kh, kw, ci) holds all output channels).
template <typename scalar_t, typename acc_t>
std::vector<acc_t> pack_weight(const ConvGeom& g, const at::Tensor& weight, const at::Tensor& scale, int64_t B) {
  TORCH_INTERNAL_ASSERT(B > 0 && g.C_out % B == 0);
  // The weight is read through its strides: a channels_last module's weight had been copied on every call (with the
  // packing, 7% of the samples at ResNeXt-50's stride-2 stage-4 block on a Zen 5).
  const scalar_t* wsrc = weight.data_ptr<scalar_t>();
  const int64_t s_co = weight.stride(0), s_ci = weight.stride(1), s_kh = weight.stride(2), s_kw = weight.stride(3);
  const at::Tensor s = scale.contiguous();
  const acc_t* sc = s.data_ptr<acc_t>();
  const int64_t cpg_in = g.C_in / g.groups, khw = int64_t(g.KH) * g.KW, rows = khw * cpg_in;
  std::vector<acc_t> wp(rows * g.C_out);
  // Packed rows (block, k, ci) of B output channels: written contiguously, rows split across threads.
  at::parallel_for(0, rows * (g.C_out / B), std::max<int64_t>(1, 16384 / B), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t block = r / rows, k = (r % rows) / cpg_in, ci = r % cpg_in;
      const scalar_t* src = wsrc + ci * s_ci + (k / g.KW) * s_kh + (k % g.KW) * s_kw;
      acc_t* dst = wp.data() + r * B;
      for (int64_t j = 0; j < B; ++j) {
        const int64_t co = block * B + j;
        dst[j] = static_cast<acc_t>(src[co * s_co]) * sc[co];
      }
    }
  });
  return wp;
}

template <typename scalar_t, typename acc_t>
void conv_bn_relu_cpu_typed(const ConvPlan& plan, const at::Tensor& input_nhwc, const at::Tensor& weight,
                            const at::Tensor& scale, const at::Tensor& shift, const at::Tensor* residual_nhwc,
                            at::Tensor& out_nhwc, bool relu, acc_t* row_stats) {
  const ConvGeom& g = plan.geom;
  const at::Tensor shift_c = shift.contiguous();
  const acc_t* sh = shift_c.data_ptr<acc_t>();
  const int64_t cpg_in = g.C_in / g.groups, cpg_out = g.C_out / g.groups;
  std::vector<int64_t> src_channel(g.C_out);
  for (int64_t co = 0; co < g.C_out; ++co) src_channel[co] = (co / cpg_out) * cpg_in;
  const Tiling& tl = plan.tiling;
  const scalar_t* in = input_nhwc.data_ptr<scalar_t>();
  scalar_t* out = out_nhwc.data_ptr<scalar_t>();
  const scalar_t* residual = residual_nhwc ? residual_nhwc->data_ptr<scalar_t>() : nullptr;
  // Grain: enough rows per task that a task does at least ~64k multiply-adds.
  const int64_t macs_per_row = g.OW * g.C_out * cpg_in * g.KH * g.KW;
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(macs_per_row, 1));
  if (plan.path == ConvPath::kWinogradF4x4 || plan.path == ConvPath::kWinogradF2x2) {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      const at::Tensor scale_c = scale.contiguous();
      const WinogradPackArgs<scalar_t> pack{weight.data_ptr<scalar_t>(), weight.stride(0), weight.stride(1),
                                            weight.stride(2),          weight.stride(3), scale_c.data_ptr<float>()};
      const int tile = plan.path == ConvPath::kWinogradF4x4 ? 4 : 2;
      const int points = tile == 4 ? WinogradF4::kPoints : WinogradF2::kPoints;
      const int64_t block = std::max<int64_t>(cpg_in, plan.winograd_lanes), blocks = g.C_in / block;
      const int64_t ublock_floats = winograd_ublock_floats(points, cpg_in, plan.winograd_lanes);
      std::vector<float> u;  // all blocks' U, image-major order only (see WinogradWeights)
      if (plan.winograd_image_major) {
        u.resize(blocks * ublock_floats);
        at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
          RK_CALL_FOR_ISA(winograd_pack, pack, plan.winograd_lanes, tile, int(cpg_in), begin, end, u.data());
        });
      }
      const WinogradWeights<scalar_t> W{u.empty() ? nullptr : u.data(), &pack};
      const std::vector<scalar_t> zero_input(g.C_in, scalar_t(0));
      BlockedProblem<scalar_t> P{};
      P.g = &g, P.in = in, P.shift = sh, P.out = out, P.relu = relu;
      P.zero_input = zero_input.data(), P.row_stats = row_stats;
      P.prefetch = plan.prefetch;
      at::parallel_for(0, blocks * g.N, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> vbuf(points * kMaxWinogradTiles * block);
        std::vector<float> mbuf(points * kMaxWinogradTiles * block);
        std::vector<float> ubuf(u.empty() ? ublock_floats : 0);
        RK_CALL_FOR_ISA(winograd_items, P, W, vbuf.data(), mbuf.data(), ubuf.data(), plan.winograd_lanes, tile,
                        int(cpg_in), begin, end);
      });
      return;
    }
  }
  if (plan.path == ConvPath::kLanes) {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      const int c = plan.lane_group, L = plan.vec_lanes;
      const std::vector<float> wl = pack_lane_weight<scalar_t>(g, weight, scale, L);
      const std::vector<scalar_t> zero_input(g.C_in, scalar_t(0));
      BlockedProblem<scalar_t> P{};
      P.g = &g, P.in = in, P.wp = wl.data(), P.shift = sh, P.out = out, P.residual = residual, P.relu = relu;
      P.zero_input = zero_input.data(), P.row_stats = row_stats;
      P.stream = plan.stream && reinterpret_cast<uintptr_t>(out) % 64 == 0;
      at::parallel_for(0, g.N * g.OH, grain, [&](int64_t begin, int64_t end) {
        std::vector<const scalar_t*> tbl(int64_t(g.KH) * g.OW * kLaneKernelWidth);
        RK_CALL_FOR_ISA(lane_rows, P, tbl.data(), c, begin, end);
      });
      return;
    }
  }
  const int nv = plan.vectors;
  // The broadcast path's weights in blocks of its nv vectors (see BlockedProblem::w_ci_stride); else one row per tap
  // and input channel.
  const int64_t w_block = plan.weight_block;
  const std::vector<acc_t> wp = pack_weight<scalar_t, acc_t>(g, weight, scale, w_block);
  if (plan.path == ConvPath::kBroadcast || plan.path == ConvPath::kExpand) {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      const std::vector<float> zero_expanded(tl.expand ? cpg_in * g.C_out : 0, 0.f);
      const std::vector<scalar_t> zero_input(g.C_in, scalar_t(0));
      const BlockedProblem<scalar_t> P{&g, tl.tile_ow, tl.span, tl.n_tiles, tl.row_slots, tl.expand, in,
                                       wp.data(), sh, src_channel.data(), out, residual, relu, zero_expanded.data(),
                                       zero_input.data(), row_stats, w_block};
      at::parallel_for(0, g.N * g.OH, grain, [&](int64_t begin, int64_t end) {
        std::vector<float> expanded(tl.expand_size);
        std::vector<int64_t> slot_tag(tl.row_slots, -1);
        const int64_t table_pixels = tl.expand ? kMaxPixelsPerBlock : broadcast_band_rows<scalar_t>(g) * g.OW;
        std::vector<const void*> src(table_pixels * g.KH * g.KW);
        // Not zero-filled: blocked_rows writes what it reads (a few hundred KB per thread).
        const int64_t packed_elements = tl.expand ? 0 : broadcast_packed_elements<scalar_t>(g);
        const auto packed = std::make_unique_for_overwrite<scalar_t[]>(packed_elements);
        BlockedScratch S{expanded.data(), slot_tag.data(), src.data(), packed_elements ? packed.get() : nullptr};
        RK_CALL_FOR_ISA(blocked_rows, P, S, nv, begin, end);
      });
      return;
    }
  }
  TORCH_INTERNAL_ASSERT(plan.path == ConvPath::kGeneric, "resnext_kernels (CPU kernel): path ", path_name(plan.path),
                        " planned for ", plan.dtype);
  at::parallel_for(0, g.N * g.OH, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(tl.acc_size), ex(tl.expand_size);
    conv_rows(g, tl, in, wp.data(), sh, src_channel.data(), out, residual, relu, begin, end, acc.data(),
              ex.data(), row_stats);
  });
}

at::Tensor conv_bn_relu_infer_cpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& scale,
                                  const at::Tensor& shift, at::IntArrayRef stride, at::IntArrayRef padding,
                                  at::IntArrayRef dilation, int64_t groups, bool relu) {
  const ConvGeom g = check_conv_bn_relu_args("resnext_kernels::conv_bn_relu_infer", input, weight, scale, shift,
                                             stride, padding, dilation, groups);
  const at::Tensor out = conv_affine_nhwc_cpu(g, input, weight, scale, shift, std::nullopt, relu);
  return out.contiguous(conv_output_memory_format(input, weight));
}

// out = relu?(out * scale + shift + residual?) over rows [r0, r1) of C channels, in place (one pass over the output).
template <bool kRelu, bool kResidual, typename scalar_t>
RK_ALWAYS_INLINE void affine_rows_body(scalar_t* out, const float* __restrict scale, const float* __restrict shift,
                                       const scalar_t* residual, int64_t C, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    scalar_t* __restrict y = out + r * C;
    const scalar_t* __restrict res = kResidual ? residual + r * C : nullptr;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      float z = static_cast<float>(y[c]) * scale[c] + shift[c];
      if constexpr (kResidual) z += static_cast<float>(res[c]);
      y[c] = static_cast<scalar_t>(kRelu && z < 0.f ? 0.f : z);  // NaN passes, as torch.relu
    }
  }
}

// One entry point per dtype for AVX-512, AVX2 and baseline x86-64 (target_clones needs plain functions).
#define RK_DEFINE_AFFINE_ROWS(scalar_t)                                                                          \
  RK_CPU_ISA_CLONES void affine_rows(scalar_t* out, const float* scale, const float* shift,                     \
                                     const scalar_t* residual, int64_t C, bool relu, int64_t r0, int64_t r1) {  \
    if (relu && residual) affine_rows_body<true, true>(out, scale, shift, residual, C, r0, r1);                 \
    else if (relu) affine_rows_body<true, false>(out, scale, shift, residual, C, r0, r1);                       \
    else if (residual) affine_rows_body<false, true>(out, scale, shift, residual, C, r0, r1);                   \
    else affine_rows_body<false, false>(out, scale, shift, residual, C, r0, r1);                                \
  }
RK_DEFINE_AFFINE_ROWS(float)
RK_DEFINE_AFFINE_ROWS(c10::BFloat16)
#undef RK_DEFINE_AFFINE_ROWS

// relu?(conv(x, weight) * scale + shift + residual?) through ATen (oneDNN), channels_last; scale and shift undefined:
// the bare convolution. The BN affine, residual and ReLU are one pass over the output after the convolution. (With
// the scale folded into a copy of the weight and the shift as oneDNN's bias, the fold was a pass over the weights
// on every call, 4.7 MB at ResNeXt-101's stride-2 stage-4 block, more than its output, and the ReLU a pass of its
// own.)
at::Tensor conv_on_aten(const ConvGeom& g, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                        const at::Tensor& shift, const at::Tensor* residual, bool relu) {
  at::Tensor out = at::convolution(x, weight.to(x.scalar_type()), std::nullopt, {g.stride_h, g.stride_w},
                                   {g.pad_h, g.pad_w}, {g.dil_h, g.dil_w}, /*transposed=*/false,
                                   /*output_padding=*/{0, 0}, g.groups)
                       .contiguous(at::MemoryFormat::ChannelsLast);
  if (!scale.defined() && !residual && !relu) return out;
  const at::TensorOptions f32 = x.options().dtype(at::kFloat);
  const at::Tensor sc = scale.defined() ? scale.to(at::kFloat).contiguous() : at::ones({g.C_out}, f32);
  const at::Tensor sh = shift.defined() ? shift.to(at::kFloat).contiguous() : at::zeros({g.C_out}, f32);
  const at::Tensor res = residual ? residual->contiguous(at::MemoryFormat::ChannelsLast) : at::Tensor();
  const float* a = sc.data_ptr<float>();
  const float* b = sh.data_ptr<float>();
  const auto run = [&](auto* y, const auto* r) {
    at::parallel_for(0, g.N * g.OH * g.OW, std::max<int64_t>(1, 4096 / g.C_out), [&](int64_t r0, int64_t r1) {
      affine_rows(y, a, b, r, g.C_out, relu, r0, r1);
    });
  };
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16,
              "resnext_kernels (CPU kernel): the ATen route takes float32 or bfloat16, got ", out.scalar_type());
  if (out.scalar_type() == at::kFloat) {
    run(out.data_ptr<float>(), res.defined() ? res.data_ptr<float>() : nullptr);
  } else {
    run(out.data_ptr<c10::BFloat16>(), res.defined() ? res.data_ptr<c10::BFloat16>() : nullptr);
  }
  return out;
}

// The row statistics the blocked kernel's epilogue computes (accumulate_row_stats, conv_blocked.h), in one pass
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
void fill_row_stats(const ConvGeom& g, const at::Tensor& out, float* row_stats) {
  const scalar_t* y = out.data_ptr<scalar_t>();
  at::parallel_for(0, g.N * g.OH, 1, [&](int64_t begin, int64_t end) {
    fill_row_stats_rows(y, g.OW, g.C_out, row_stats, begin, end);
  });
}

}  // namespace

at::Tensor conv_affine_nhwc_cpu(const ConvPlan& plan, const ConvGeom& g, const at::Tensor& input,
                                const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& shift,
                                const std::optional<at::Tensor>& residual, bool relu, at::Tensor* row_stats) {
  TORCH_CHECK(input.device().is_cpu(), "resnext_kernels (CPU kernel): input must be a CPU tensor");
  const PathScope scope(path_scope(plan.path));
  const auto dtype = input.scalar_type();
  TORCH_INTERNAL_ASSERT(plan.dtype == dtype && (plan.form == ConvForm::kTraining) == (row_stats != nullptr) &&
                        (plan.form == ConvForm::kResidual) == residual.has_value());
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == at::IntArrayRef({g.N, g.C_out, g.OH, g.OW}) && residual->scalar_type() == dtype,
                "resnext_kernels (CPU kernel): residual must have the output's shape [", g.N, ", ", g.C_out, ", ",
                g.OH, ", ", g.OW, "] and dtype ", dtype, ", got ", residual->sizes(), " ", residual->scalar_type());
  }
  if (is_onednn(plan.path)) {
    const at::Tensor res = residual.has_value() ? residual->contiguous(at::MemoryFormat::ChannelsLast) : at::Tensor();
    at::Tensor out = conv_on_aten(g, input.contiguous(at::MemoryFormat::ChannelsLast), weight, scale, shift,
                                  res.defined() ? &res : nullptr, relu);
    if (row_stats) {
      *row_stats = at::empty({g.N * g.OH, 3, g.C_out}, input.options().dtype(at::kFloat));
      AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "fill_row_stats", [&] {
        fill_row_stats<scalar_t>(g, out, row_stats->data_ptr<float>());
      });
    }
    return out;
  }
  at::Tensor out = at::empty({g.N, g.C_out, g.OH, g.OW}, input.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() > 0) {
    const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor res = residual.has_value() ? residual->contiguous(at::MemoryFormat::ChannelsLast) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "conv_affine_nhwc_cpu", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      acc_t* stats = nullptr;
      if (row_stats) {
        *row_stats = at::empty({g.N * g.OH, 3, g.C_out}, input.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
        stats = row_stats->data_ptr<acc_t>();
      }
      const at::TensorOptions acc_options = input.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
      const at::Tensor sc = scale.defined() ? scale : at::ones({g.C_out}, acc_options);
      const at::Tensor sh = shift.defined() ? shift : at::zeros({g.C_out}, acc_options);
      conv_bn_relu_cpu_typed<scalar_t, acc_t>(plan, x, weight, sc, sh, res.defined() ? &res : nullptr, out, relu,
                                              stats);
    });
  }
  return out;
}

at::Tensor conv_affine_nhwc_cpu(const ConvGeom& g, const at::Tensor& input, const at::Tensor& weight,
                                const at::Tensor& scale, const at::Tensor& shift,
                                const std::optional<at::Tensor>& residual, bool relu, at::Tensor* row_stats) {
  const ConvForm form = row_stats ? ConvForm::kTraining : residual.has_value() ? ConvForm::kResidual
                                                                               : ConvForm::kInference;
  return conv_affine_nhwc_cpu(plan_cpu_conv(g, input.scalar_type(), form), g, input, weight, scale, shift, residual,
                              relu, row_stats);
}

}  // namespace cpu
}  // namespace rk

TORCH_LIBRARY_IMPL(resnext_kernels, CPU, m) {
  m.impl("conv_bn_relu_infer", &rk::cpu::conv_bn_relu_infer_cpu);
}
