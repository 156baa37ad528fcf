// CPU kernel of the grouped convolution's weight gradient (NHWC), used by the training backward where
// plan_cpu_conv_grads says so (conv_plan.h, which also splits the work: WgradPlan).
//
// dW[co][ci][kh][kw] = sum over output pixels p of gy[p][co] * x[src(p, kh, kw)][grp(co) * cpg_in + ci].
//   * wgrad_lanes (groups of c = cpg_in = cpg_out channels, c dividing the vector width or a multiple of it): vector
//     lanes are consecutive input channels, so each tap's input is one contiguous load, and the gy multiplier of a
//     lane is one in-register permute of the pixel's gy vector (wgrad_task_lanes).
//   * wgrad_broadcast, wgrad_expand (other widths) vectorize across output channels like the forward kernels: for a
//     block of CB output channels the input rows are laid out as E[j][ci][lane] (expand: lane l holds the input
//     channel of output channel co0 + l's group; broadcast, when the block lies inside one group: one value per
//     ci), with zeros at padded columns. A microkernel keeps R columns (one column = one (tap, ci) pair) x NV
//     vectors of output channels in registers over every pixel of a band of rows (wgrad_task_broadcast_expand).
//   * wgrad_generic (float64, CPUs without AVX2, other widths): the same arithmetic with the accumulator in memory.
//   * Deterministic: the pixels are cut into fixed chunks of output rows whose size depends on the shape only
//     (never on the thread count); each (chunk, channel block) task adds into its own partial sum, and the
//     partial sums are merged in chunk order, in float64. Results are bitwise identical run to run and for any
//     number of threads.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <vector>

#include "cpu/conv_cpu.h"
#include "cpu/simd.h"

namespace rk {
namespace cpu {
namespace {

// Everything a task needs, fixed for one call.
template <typename scalar_t, typename acc_t>
struct WgradProblem {
  const ConvGeom* g;
  const WgradPlan* plan;
  const scalar_t* x;   // NHWC input
  const scalar_t* gy;  // NHWC gradient of the conv output
  acc_t* partial;      // [n_chunks][taps * cpg_in][C_out], lanes kernel [n_chunks][taps][cpg][C_in]
  const acc_t* zeros;  // one E row of zeros, read by the padding columns of a microkernel's last call
};

// E[j][ci][l] for input row ih of image n and output channels [co0, co0 + cb): zero outside the image.
// lane_channel[l] is the first input channel of output channel co0 + l's group.
template <typename scalar_t, typename acc_t>
void expand_row(const WgradProblem<scalar_t, acc_t>& P, int64_t n, int64_t ih, int64_t co0, int64_t cb,
                const int64_t* __restrict lane_channel, acc_t* __restrict e) {
  const ConvGeom& g = *P.g;
  const WgradPlan& pl = *P.plan;
  const int64_t cpg_in = g.C_in / g.groups, cpg_out = g.C_out / g.groups;
  const int64_t col = cpg_in * pl.lanes;
  for (int64_t j = 0; j < pl.span; ++j) {
    acc_t* ej = e + j * col;
    const int64_t iw = j - g.pad_w;
    if (iw < 0 || iw >= g.W) {
      std::fill(ej, ej + col, acc_t(0));
      continue;
    }
    const scalar_t* __restrict px = P.x + ((n * g.H + ih) * g.W + iw) * g.C_in;
    if (pl.broadcast) {
      const scalar_t* src = px + (co0 / cpg_out) * cpg_in;
      for (int64_t ci = 0; ci < cpg_in; ++ci) ej[ci] = static_cast<acc_t>(src[ci]);
    } else {
      for (int64_t ci = 0; ci < cpg_in; ++ci) {
        acc_t* __restrict d = ej + ci * pl.lanes;
        for (int64_t l = 0; l < cb; ++l) d[l] = static_cast<acc_t>(px[lane_channel[l] + ci]);
        for (int64_t l = cb; l < pl.lanes; ++l) d[l] = acc_t(0);
      }
    }
  }
}

// Per-task scratch: expanded input rows (E) with their tags (generic path), the lanes' input channels,
// columns of a microkernel call write into.
template <typename acc_t>
struct WgradScratch {
  std::vector<acc_t> rows;
  std::vector<int64_t> tag;
  std::vector<int64_t> lane_channel;
  std::vector<int64_t> column_dh, column_offset;
  int64_t slots, row_size, band_rows;

  // The generic kernel caches `slots` expanded rows; broadcast/expand expand whole bands of band_rows output rows.
  WgradScratch(const ConvGeom& g, const WgradPlan& pl, int64_t band_budget)
      : slots(int64_t(g.KH - 1) * g.dil_h + 1), row_size(pl.span * (g.C_in / g.groups) * pl.lanes) {
    const int64_t fit = band_budget / std::max<int64_t>(row_size, 1);  // input rows that fit the budget
    band_rows = std::clamp<int64_t>((fit - slots) / g.stride_h + 1, 1, g.OH);
    const int64_t band_input_rows = (band_rows - 1) * g.stride_h + slots;
    rows.resize(pl.jt > 0 ? 0 : std::max(slots, pl.nv > 0 ? band_input_rows : slots) * row_size);  // jt: no E rows
    // Column c = (kh * KW + kw) * cpg_in + ci reads input row ih0 + column_dh[c] at E offset column_offset[c].
    const int64_t cpg_in = g.C_in / g.groups;
    for (int64_t kh = 0; kh < g.KH; ++kh)
      for (int64_t kw = 0; kw < g.KW; ++kw)
        for (int64_t ci = 0; ci < cpg_in; ++ci) {
          column_dh.push_back(kh * g.dil_h);
          column_offset.push_back((kw * g.dil_w * cpg_in + ci) * pl.lanes);
        }
    tag.assign(slots, -1);
    lane_channel.resize(pl.cb);
  }
  void start_block(const ConvGeom& g, int64_t co0, int64_t cb) {
    const int64_t cpg_in = g.C_in / g.groups, cpg_out = g.C_out / g.groups;
    for (int64_t l = 0; l < cb; ++l) lane_channel[l] = ((co0 + l) / cpg_out) * cpg_in;
    std::fill(tag.begin(), tag.end(), -1);
  }
  // The expanded row ih of image n, expanded now unless its slot holds it already (generic path).
  // `expand(n, ih, e)` fills a row.
  template <typename Expand>
  const acc_t* row(int64_t H, int64_t n, int64_t ih, const Expand& expand) {
    const int64_t slot = ih % slots, key = n * H + ih;
    acc_t* e = rows.data() + slot * row_size;
    if (tag[slot] != key) {
      expand(n, ih, e);
      tag[slot] = key;
    }
    return e;
  }
};

// acc[r][v] += sum over npix pixels of gy[p][v] * E_r[p]; the R columns' sources advance by `step` per pixel.
// The accumulators stay in registers across calls (everything is inlined into one loop nest).
template <class V, int NV, int R, bool BCAST, typename scalar_t>
RK_ALWAYS_INLINE void wgrad_microkernel(typename V::vec (&acc)[R][NV], int64_t npix, const scalar_t* gy,
                                        int64_t gy_step, const float* const* src, int64_t step) {
  using vec = typename V::vec;
  constexpr int L = V::kLanes;
  for (int64_t p = 0; p < npix; ++p) {
    vec G[NV];
    for (int v = 0; v < NV; ++v) G[v] = vload<V>(gy + p * gy_step + v * L);
#pragma GCC unroll 24
    for (int r = 0; r < R; ++r) {
      const float* s = src[r] + p * step;
      if constexpr (BCAST) {
        const float xs = *s;
        for (int v = 0; v < NV; ++v) acc[r][v] += G[v] * xs;
      } else {
        for (int v = 0; v < NV; ++v) acc[r][v] += G[v] * vload<V>(s + v * L);
      }
    }
  }
}

// The first k (< lanes) elements of p, zeros after.
template <class V, typename scalar_t>
RK_ALWAYS_INLINE typename V::vec load_partial(const scalar_t* p, int64_t k) {
  float buf[V::kLanes] = {};
  for (int64_t i = 0; i < k; ++i) buf[i] = static_cast<float>(p[i]);
  return vload<V>(buf);
}

// expand_row for the broadcast/expand kernel: when a vector's lanes cover whole groups and a group has no more inputs
// than outputs, the inputs one vector of lanes needs are one contiguous chunk, and each ci is one in-register permute.
template <class V, typename scalar_t>
RK_ALWAYS_INLINE void expand_row_vec(const WgradProblem<scalar_t, float>& P, int64_t n, int64_t ih, int64_t co0,
                                     const int64_t* __restrict lane_channel, float* __restrict e) {
  using vec = typename V::vec;
  using ivec = typename V::ivec;
  constexpr int L = V::kLanes;
  const ConvGeom& g = *P.g;
  const WgradPlan& pl = *P.plan;
  const int64_t cpg_in = g.C_in / g.groups, cpg_out = g.C_out / g.groups;
  if (pl.broadcast || !(cpg_in <= cpg_out && L % cpg_out == 0)) {
    return expand_row(P, n, ih, co0, pl.cb, lane_channel, e);
  }
  const int64_t cb = pl.cb, col = cpg_in * cb, chunk = (L / cpg_out) * cpg_in;
  ivec lane_src;
  for (int l = 0; l < L; ++l) lane_src[l] = int32_t((l / cpg_out) * cpg_in);
  for (int64_t j = 0; j < pl.span; ++j) {
    float* ej = e + j * col;
    const int64_t iw = j - g.pad_w;
    if (iw < 0 || iw >= g.W) {
      for (int64_t i = 0; i < col; i += L) vstore<V>(ej + i, vec{});
      continue;
    }
    const scalar_t* px = P.x + ((n * g.H + ih) * g.W + iw) * g.C_in;
    for (int64_t v0 = 0; v0 < cb; v0 += L) {
      const scalar_t* src = px + lane_channel[v0];
      const vec x = chunk == L ? vload<V>(src) : load_partial<V>(src, chunk);
      for (int64_t ci = 0; ci < cpg_in; ++ci) vstore<V>(ej + ci * cb + v0, __builtin_shuffle(x, lane_src + int32_t(ci)));
    }
  }
}

// One task of the broadcast/expand kernel: output rows [row0, row1) x output channels [co0, co0 + cb) into `part`.
// The rows are cut into bands inside one image whose expanded input rows fit kBandBudget floats; a band's input
// rows are expanded once, then for each tile of R columns (column = (kh, kw, ci)) the accumulators stay in
// registers over every pixel of the band and are added into the partial sum once (a flush per output row would
// touch a C_out-strided line per column, more than the multiply-adds at 7x7).
constexpr int64_t kBandBudget = 64 * 1024;

template <class V, int NV, bool BCAST, typename scalar_t>
RK_ALWAYS_INLINE void wgrad_task_broadcast_expand(const WgradProblem<scalar_t, float>& P, WgradScratch<float>& S,
                                                  int64_t row0, int64_t row1, int64_t co0) {
  using vec = typename V::vec;
  constexpr int L = V::kLanes;
  constexpr int R = V::kAccRegs / NV;
  const ConvGeom& g = *P.g;
  const WgradPlan& pl = *P.plan;
  const int64_t cpg_in = g.C_in / g.groups, C_out = g.C_out;
  const int64_t col = cpg_in * pl.lanes;  // E floats per input column
  const int64_t step = g.stride_w * col;
  const int64_t row_size = pl.span * col;
  const int64_t columns = int64_t(g.KH) * g.KW * cpg_in;
  float* part = P.partial + (row0 / pl.rows_per_chunk) * pl.weight_size;
  float* band = S.rows.data();
  const int64_t band_rows = S.band_rows;  // output rows per band
  S.start_block(g, co0, pl.cb);
  for (int64_t b0 = row0; b0 < row1;) {
    const int64_t n = b0 / g.OH, oh0 = b0 % g.OH;
    const int64_t b1 = std::min({row1, b0 + band_rows, (n + 1) * g.OH});  // stays inside image n
    const int64_t ih_base = oh0 * g.stride_h - g.pad_h;  // input row of E[0]
    const int64_t ih_last = (b1 - 1 - n * g.OH) * g.stride_h - g.pad_h + int64_t(g.KH - 1) * g.dil_h;
    for (int64_t ih = std::max<int64_t>(ih_base, 0); ih <= std::min<int64_t>(ih_last, g.H - 1); ++ih) {
      expand_row_vec<V>(P, n, ih, co0, S.lane_channel.data(), band + (ih - ih_base) * row_size);
    }
    for (int64_t c0 = 0; c0 < columns; c0 += R) {
      vec acc[R][NV];
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < NV; ++v) acc[r][v] = vec{};
      const float* src[R];
      for (int64_t row = b0; row < b1; ++row) {
        const int64_t oh = row - n * g.OH;
        const int64_t ih0 = oh * g.stride_h - g.pad_h;
        for (int r = 0; r < R; ++r) {
          const int64_t c = c0 + r;
          const int64_t ih = c < columns ? ih0 + S.column_dh[c] : -1;
          src[r] = (ih < 0 || ih >= g.H) ? P.zeros : band + (ih - ih_base) * row_size + S.column_offset[c];
        }
        wgrad_microkernel<V, NV, R, BCAST>(acc, g.OW, P.gy + row * g.OW * C_out + co0, C_out, src, step);
      }
      for (int r = 0; r < R && c0 + r < columns; ++r) {
        float* d = part + (c0 + r) * C_out + co0;  // column c = (kh * KW + kw) * cpg_in + ci: the partial's row
        for (int v = 0; v < NV; ++v) vstore<V>(d + v * L, vload<V>(d + v * L) + acc[r][v]);
      }
    }
    b0 = b1;
  }
}

// The lanes kernel, for groups of c = cpg_in = cpg_out channels with c dividing the vector width (ResNeXt's
// 4, 8 and 16): the lanes of a vector are L consecutive *input* channels (L / c whole groups), so the input of a
// tap is one contiguous load and needs no expansion. The accumulator acc[j][kw] holds, in lane (group, ci), the
// gradient of weight [group * c + j][ci][kh][kw]; its multiplier is gy of output channel group * c + j in every
// lane of that group: one in-register permute of the pixel's gy vector, shared by the 3 taps of a kernel row.
// Per pixel and kernel row: 1 gy load, jt permutes, 3 input loads and 3 * jt multiply-adds.
template <class V, int JT, bool WIDE, typename scalar_t>
RK_ALWAYS_INLINE void wgrad_task_lanes(const WgradProblem<scalar_t, float>& P, int64_t row0, int64_t row1,
                                       int64_t ch0) {
  using vec = typename V::vec;
  using ivec = typename V::ivec;
  constexpr int L = V::kLanes;
  const ConvGeom& g = *P.g;
  const WgradPlan& pl = *P.plan;
  const int64_t C = g.C_in, c = C / g.groups;
  float* part = P.partial + (row0 / pl.rows_per_chunk) * pl.weight_size;
  // Narrow groups (c < L): lane l of the permuted gy vector j is output channel (l / c) * c + j of the unit.
  // Wide groups (c a multiple of L): the unit lies inside one group, and gy of output channel j is a broadcast.
  ivec idx[L];
  if constexpr (!WIDE) {
    for (int64_t j = 0; j < c; ++j)
      for (int l = 0; l < L; ++l) idx[j][l] = int32_t((l / c) * c + j);
  }
  const int64_t gy_offset = WIDE ? (ch0 / c) * c : ch0;  // first gy channel a unit reads
  constexpr bool kPrefetchNextRow = L * sizeof(scalar_t) >= 64;
  // Accumulators live across all the chunk's rows for one (kernel row, output-channel tile), so the partial sum
  // is read and written once per chunk, not once per output row (at 7x7 a flush per row costs as much as the math).
  // The unit's input and gy slices of a chunk (one cache line per pixel) stay in L2 across the passes.
  for (int64_t j0 = 0; j0 < c; j0 += JT) {
    for (int32_t kh = 0; kh < g.KH; ++kh) {
      vec acc[JT][3];
      for (int j = 0; j < JT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = vec{};
      for (int64_t row = row0; row < row1; ++row) {
        const int64_t n = row / g.OH, oh = row % g.OH;
        const int64_t ih = oh * g.stride_h - g.pad_h + int64_t(kh) * g.dil_h;
        if (ih < 0 || ih >= g.H) continue;
        const scalar_t* gy_row = P.gy + row * g.OW * C + gy_offset;
        const scalar_t* x_row = P.x + (n * g.H + ih) * g.W * C + ch0;
        // Where a unit's slice of a pixel is a whole cache line (float32, 16 lanes), the next row's lines are
        // prefetched one row ahead: C elements apart, the hardware prefetchers do not bring them in time. With 8
        // lanes (two units per line, run back to back in chunk-major order) it measured no consistent gain, so AVX2
        // goes without.
        const bool next = kPrefetchNextRow && row + 1 < row1 && oh + 1 < g.OH && ih + g.stride_h < g.H;
        const scalar_t* gy_next = gy_row + g.OW * C;
        const scalar_t* x_next = x_row + g.stride_h * g.W * C;
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          if (next) {
            __builtin_prefetch(gy_next + ow * C);
            for (int32_t s = 0; s < g.stride_w; ++s) {
              const int64_t iw = ow * g.stride_w + s;
              if (iw < g.W) __builtin_prefetch(x_next + iw * C);
            }
          }
          vec xv[3];
          for (int kw = 0; kw < 3; ++kw) {
            const int64_t iw = ow * g.stride_w - g.pad_w + int64_t(kw) * g.dil_w;
            xv[kw] = (iw >= 0 && iw < g.W) ? vload<V>(x_row + iw * C) : vec{};
          }
          if constexpr (WIDE) {
            const scalar_t* gp = gy_row + ow * C + j0;
            for (int j = 0; j < JT; ++j) {
              const float gs = static_cast<float>(gp[j]);
              for (int kw = 0; kw < 3; ++kw) acc[j][kw] += xv[kw] * gs;
            }
          } else {
            const vec gv = vload<V>(gy_row + ow * C);
            for (int j = 0; j < JT; ++j) {
              const vec gj = __builtin_shuffle(gv, idx[j0 + j]);
              for (int kw = 0; kw < 3; ++kw) acc[j][kw] += gj * xv[kw];
            }
          }
        }
      }
      for (int j = 0; j < JT; ++j) {
        for (int kw = 0; kw < 3; ++kw) {
          float* d = part + ((int64_t(kh) * 3 + kw) * c + j0 + j) * C + ch0;
          vstore<V>(d, vload<V>(d) + acc[j][kw]);
        }
      }
    }
  }
}

template <class V, typename scalar_t>
RK_ALWAYS_INLINE void wgrad_task_dispatch(const WgradProblem<scalar_t, float>& P, WgradScratch<float>& S,
                                          int64_t row0, int64_t row1, int64_t co0) {
  const WgradPlan& pl = *P.plan;
  if (pl.jt > 0) {
    if (P.g->C_in / P.g->groups >= V::kLanes) {  // wide groups
      if constexpr (V::kAccRegs / 3 >= 8) return wgrad_task_lanes<V, 8, true>(P, row0, row1, co0);
      else return wgrad_task_lanes<V, 4, true>(P, row0, row1, co0);
    }
    if constexpr (V::kAccRegs / 3 >= 8) {
      if (pl.jt == 8) return wgrad_task_lanes<V, 8, false>(P, row0, row1, co0);
    }
    if (pl.jt == 4) return wgrad_task_lanes<V, 4, false>(P, row0, row1, co0);
    return wgrad_task_lanes<V, 2, false>(P, row0, row1, co0);
  }
  if (pl.nv == 2) {
    if (pl.broadcast) wgrad_task_broadcast_expand<V, 2, true>(P, S, row0, row1, co0);
    else wgrad_task_broadcast_expand<V, 2, false>(P, S, row0, row1, co0);
  } else {
    if (pl.broadcast) wgrad_task_broadcast_expand<V, 1, true>(P, S, row0, row1, co0);
    else wgrad_task_broadcast_expand<V, 1, false>(P, S, row0, row1, co0);
  }
}

#if RK_X86_DISPATCH
#define RK_DEFINE_WGRAD_TASK(NAME, TARGET, VEC, scalar_t)                                                     \
  __attribute__((target(TARGET))) void NAME(const WgradProblem<scalar_t, float>& P, WgradScratch<float>& S,     \
                                            int64_t row0, int64_t row1, int64_t co0) {                           \
    wgrad_task_dispatch<VEC>(P, S, row0, row1, co0);                                                             \
  }
RK_DEFINE_WGRAD_TASK(wgrad_task_avx512, "arch=x86-64-v4", Avx512Vec, float)
RK_DEFINE_WGRAD_TASK(wgrad_task_avx512, "arch=x86-64-v4", Avx512Vec, c10::BFloat16)
RK_DEFINE_WGRAD_TASK(wgrad_task_avx2, "arch=x86-64-v3", Avx2Vec, float)
RK_DEFINE_WGRAD_TASK(wgrad_task_avx2, "arch=x86-64-v3", Avx2Vec, c10::BFloat16)
#undef RK_DEFINE_WGRAD_TASK
#endif

// One task of the generic path (any dtype, any width): the same arithmetic with the accumulator in memory.
template <typename scalar_t, typename acc_t>
void wgrad_task_generic(const WgradProblem<scalar_t, acc_t>& P, WgradScratch<acc_t>& S, int64_t row0, int64_t row1,
                        int64_t co0) {
  const ConvGeom& g = *P.g;
  const WgradPlan& pl = *P.plan;
  const int64_t cpg_in = g.C_in / g.groups, C_out = g.C_out;
  const int64_t cb = std::min(pl.cb, C_out - co0);
  const int64_t col = cpg_in * pl.lanes;
  acc_t* part = P.partial + (row0 / pl.rows_per_chunk) * pl.weight_size;
  S.start_block(g, co0, cb);
  for (int64_t row = row0; row < row1; ++row) {
    const int64_t n = row / g.OH, oh = row % g.OH;
    const scalar_t* gy = P.gy + row * g.OW * C_out + co0;
    for (int32_t kh = 0; kh < g.KH; ++kh) {
      const int64_t ih = oh * g.stride_h - g.pad_h + int64_t(kh) * g.dil_h;
      if (ih < 0 || ih >= g.H) continue;
      const acc_t* e = S.row(g.H, n, ih, [&](int64_t n_, int64_t ih_, acc_t* dst) {
        expand_row(P, n_, ih_, co0, cb, S.lane_channel.data(), dst);
      });
      for (int32_t kw = 0; kw < g.KW; ++kw) {
        for (int64_t ci = 0; ci < cpg_in; ++ci) {
          acc_t* __restrict d = part + ((int64_t(kh) * g.KW + kw) * cpg_in + ci) * C_out + co0;
          const acc_t* s = e + int64_t(kw) * g.dil_w * col + ci * pl.lanes;
          for (int64_t ow = 0; ow < g.OW; ++ow) {
            const scalar_t* __restrict gp = gy + ow * C_out;
            const acc_t* __restrict sp = s + ow * g.stride_w * col;
#pragma omp simd
            for (int64_t l = 0; l < cb; ++l) d[l] += static_cast<acc_t>(gp[l]) * sp[l];
          }
        }
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void weight_grad_typed(const ConvGeom& g, const WgradPlan& pl, const at::Tensor& x, const at::Tensor& gy,
                       at::Tensor& grad_weight) {
  constexpr bool kFloatAcc = std::is_same_v<acc_t, float>;
  const CpuIsa isa = kFloatAcc ? detected_isa() : CpuIsa::kBaseline;
  std::vector<acc_t> partial(pl.n_chunks * pl.weight_size, acc_t(0));
  const int64_t cpg_in = g.C_in / g.groups;
  std::vector<acc_t> zeros(pl.span * cpg_in * pl.lanes, acc_t(0));
  const WgradProblem<scalar_t, acc_t> P{&g, &pl, x.data_ptr<scalar_t>(), gy.data_ptr<scalar_t>(), partial.data(),
                                        zeros.data()};
  const int64_t tasks = pl.n_chunks * pl.n_cblocks;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    WgradScratch<acc_t> S(g, pl, kBandBudget);
    for (int64_t t = t0; t < t1; ++t) {
      // Chunk-major: a thread's consecutive tasks are the channel blocks of one chunk of rows, so the input and
      // gradient lines one block reads half of (8 of 16 channels) are still in cache for the next block (block-major,
      // the block's other chunks evict them).
      const int64_t chunk = t / pl.n_cblocks, co0 = (t % pl.n_cblocks) * pl.cb;
      const int64_t row0 = chunk * pl.rows_per_chunk, row1 = std::min(pl.rows, row0 + pl.rows_per_chunk);
#if RK_X86_DISPATCH
      if constexpr (kFloatAcc) {
        if (pl.nv > 0) {
          if (isa == CpuIsa::kAvx512) wgrad_task_avx512(P, S, row0, row1, co0);
          else wgrad_task_avx2(P, S, row0, row1, co0);
          continue;
        }
      }
#endif
      wgrad_task_generic(P, S, row0, row1, co0);
    }
  });
  // Merge the chunks in order (float64), in the partials' layout (contiguous, vectorized, where gathering each
  // weight element's chunks would be a strided scalar loop), then transpose to weight [co][ci][kh][kw].
  std::vector<double> total(pl.weight_size);
  at::parallel_for(0, pl.weight_size, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) total[i] = static_cast<double>(partial[i]);
    for (int64_t c = 1; c < pl.n_chunks; ++c) {
      const acc_t* p = partial.data() + c * pl.weight_size;
      for (int64_t i = i0; i < i1; ++i) total[i] += static_cast<double>(p[i]);
    }
  });
  const int64_t taps = int64_t(g.KH) * g.KW;
  scalar_t* out = grad_weight.data_ptr<scalar_t>();
  at::parallel_for(0, g.C_out, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t co = c0; co < c1; ++co) {
      for (int64_t ci = 0; ci < cpg_in; ++ci) {
        for (int64_t tap = 0; tap < taps; ++tap) {
          const int64_t idx = pl.jt > 0 ? (tap * cpg_in + co % cpg_in) * g.C_in + (co / cpg_in) * cpg_in + ci
                                        : (tap * cpg_in + ci) * g.C_out + co;
          out[(co * cpg_in + ci) * taps + tap] = static_cast<scalar_t>(total[idx]);
        }
      }
    }
  });
}

}  // namespace

at::Tensor conv_weight_grad_cpu(const ConvGeom& g, const WgradPlan& plan, const at::Tensor& input,
                                const at::Tensor& grad_y) {
  at::Tensor grad_weight =
      at::empty({g.C_out, g.C_in / g.groups, g.KH, g.KW}, input.options().memory_format(at::MemoryFormat::Contiguous));
  if (grad_weight.numel() == 0) return grad_weight;
  if (g.N * g.OH * g.OW == 0 || g.H * g.W == 0) return grad_weight.zero_();
  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor gy = grad_y.contiguous(at::MemoryFormat::ChannelsLast);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "conv_weight_grad_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    weight_grad_typed<scalar_t, acc_t>(g, plan, x, gy, grad_weight);
  });
  return grad_weight;
}

}  // namespace cpu
}  // namespace rk
