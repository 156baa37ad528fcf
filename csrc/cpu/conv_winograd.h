// Winograd path of the CPU fused conv kernel: 3x3 convolutions with stride 1 and dilation 1 whose groups have 8, 16,
// 32 or 64 channels in and out (ResNeXt-50 32x4d stages 2-4; dense 3x3 convolutions of up to 64 channels).
//
// F(2x2, 3x3) computes a 2x2 block of outputs from a 4x4 block of inputs with 16 multiplies per (input, output)
// channel pair instead of 36 (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016):
//   Y = A^T [ (G w G^T) .* (B^T d B) ] A
// with B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1] and
// A^T = [1 1 1 0; 0 1 -1 -1]. The weight transform U = G w G^T (BN scale folded in) is done once per call
// (winograd_pack_group). Per point p of the 4x4 transform domain, the products summed over a
// group's input channels are a small GEMM, M_p[tile][co] = sum_ci V_p[tile][ci] U_p[ci][co]: the direct
// convolution's 9 multiply-adds per (output pixel, ci, co) become 4 (2.25x fewer), for the price of the input and
// output transforms (adds only). All transform coefficients are 0, +-1 and 1/2, so the results stay within a few
// float32 rounding steps of the direct sum (the tests hold both to the same float64 reference tolerances).
//
// F(4x4, 3x3) (WinogradF4, from kWinograd4MinTiles tiles on) computes a 4x4 block of outputs from a 6x6
// block of inputs with 36 multiplies per channel pair instead of 144: 2.25 per output instead of F(2x2)'s 4, 4x
// fewer than direct. Its matrices (kWinograd4BT, kWinograd4AT, and G in winograd_weight_apply) come from the points
// 0, 1, -1, 1/2, -2 and infinity; its float32 error is a few times direct summation's (1-2e-6 of the output scale
// at ResNeXt shapes, against 2-9e-7), within the tests' float64-reference bound of 1e-5.
//
// An image's tiles (ceil(OH/S) x ceil(OW/S) for S = 2 or 4, raster order) go in blocks of up to TB tiles, for one
// block of channels at a time (see winograd_items for the work items):
//   1. input transform (winograd_input_transform, winograd4_input_transform): V_p for every tile of the block ->
//      vbuf[p][tile][c];
//   2. GEMMs (winograd_gemm): per point p, group and NV vectors of output channels, a register-blocked TB x NV
//      microkernel (each V value broadcast, each U vector shared by the TB tiles) -> mbuf[p][tile][c];
//   3. output transform (winograd_output_transform, winograd4_output_transform) with the blocked path's epilogue
//      (winograd_store_row): shift, ReLU, store of the outputs inside the image, and row statistics for the
//      training form (a row's tiles come in order, so the first one sets the pivot). No residual: a call with one
//      takes the other paths (the bottleneck adds it to its last, 1x1, convolution).
// While a block's GEMMs and output transform run, software prefetches bring in the next block's input windows and
// this block's output lines (WinogradPrefetch): interleaved A/B, N=8, 2 threads, inference: 1.10-1.15x faster at
// ResNeXt-50 stage 2, 1.18-1.22x at stage 3, 1.09-1.11x at stage 4.
// Per-phase timing of F(2x2) at ResNeXt-50 stage 3 (one thread, N=8, phases skipped one at a time): the GEMMs take
// about 60% of the time, the two transforms about 30%, the weight transform and setup about 10%.
//
// Included by conv_bn_relu.cpp only (always_inline, compiled once per ISA entry point there).
#pragma once

#include "cpu/conv_blocked.h"

namespace rk {
namespace cpu {

// 8-lane (ymm) vectors in AVX-512 code, which has 32 of them: for groups of 8 channels. On Zen 4 a 512-bit FMA is
// two 256-bit halves, so the narrower vector loses no multiply-add throughput.
struct Avx512YmmVec {
  typedef float vec __attribute__((vector_size(32)));
  static constexpr int kLanes = 8;
  static constexpr int kAccRegs = 24;
  static constexpr int kMaxBroadcastVectors = 4;  // of 32 registers, as Avx512Vec
};

// The two tile sizes: F(2x2, 3x3) (4x4 input tiles, 16 transform points) and F(4x4, 3x3) (6x6 input tiles, 36 points).
struct WinogradF2 {
  static constexpr int kTile = 2, kPoints = 16;
};
struct WinogradF4 {
  static constexpr int kTile = 4, kPoints = 36;
};
// F(4x4) tiles (N * ceil(OH / 4) * ceil(OW / 4)) from which F(4x4, 3x3) runs instead of F(2x2, 3x3). Its GEMMs do
// 1.78x fewer multiply-adds (36 per 16 outputs against 16 per 4), its weight transform 2.25x more (36 points per
// kernel against 16), which a few tiles do not pay back. Measured on ResNeXt-50's 7x7 stage 4 (Zen 3, AVX2, 2
// threads, interleaved A/B): F(2x2)/F(4x4) time 0.91 at N = 1 (4 tiles), 1.05 at N = 2, 1.14 at N = 4, 1.35 at N = 8;
// at 14x14 (16 tiles per image) 1.31 at N = 1; 1.17-1.67 at the other ResNeXt-50 and 101 stride-1 stages, N = 1
// and 8.
constexpr int64_t kWinograd4MinTiles = 8;
// Tiles per block at most.
constexpr int kMaxWinogradTiles = 24;

// F(4x4, 3x3) from the interpolation points 0, 1, -1, 1/2, -2 and infinity. Against the common 0, +-1, +-2 this
// measured 2-3x less float32 error (1-2e-6 of the output scale at 8-64 channels per group, direct summation
// 3-9e-7; the +-2 set 3-5e-6), for a few more adds in the input transform (its rows are not pairwise symmetric).
// B^T and A^T hold only values exact in binary; G (the weight transform, winograd_weight_apply)
// has thirds and fifteenths.
inline constexpr float kWinograd4BT[6][6] = {
    {1, -1.5f, -2, 1.5f, 1, 0}, {0, -1, 0.5f, 2.5f, 1, 0},    {0, 1, -2.5f, 0.5f, 1, 0},
    {0, -2, -1, 2, 1, 0},       {0, 0.5f, -1, -0.5f, 1, 0},   {0, 1, -1.5f, -2, 1.5f, 1}};
inline constexpr float kWinograd4AT[4][6] = {
    {1, 1, 1, 1, 1, 0}, {0, 1, -1, 0.5f, -2, 0}, {0, 1, 1, 0.25f, 4, 0}, {0, 1, -1, 0.125f, -8, 1}};

// Work-item order (see winograd_items): image-major while the transformed weights of all groups, 16 C_in C_out / groups
// floats, fit in this many bytes (about an L2), group-major beyond. Measured on ResNeXt-50 (2 threads): the orders
// tie at stages 2-3 (128 and 512 KB of U); at stage 4 (2 MB) group-major took 1.04 ms against image-major's 1.16.
constexpr int64_t kImageMajorWeightBytes = 1024 * 1024;

template <class F>
inline bool winograd_image_major(const ConvGeom& g) {
  return F::kPoints * g.C_in * (g.C_out / g.groups) * int64_t(sizeof(float)) <= kImageMajorWeightBytes;
}

// The weight transform's source: the conv weight read through its strides (a channels_last module's weight would
// otherwise be copied on every call), and the folded BN scale per output channel.
template <typename scalar_t>
struct WinogradPackArgs {
  const scalar_t* w;
  int64_t s_co, s_ci, s_kh, s_kw;
  const float* scale;
};

// The transformed weights U, [group][points][CPG][CPG]: packed for all groups before the work (image-major order, where
// every thread needs every group), or transformed group by group by the thread that works on the group
// (group-major order), into its own buffer: no pass writing and re-reading all groups' U (2 MB of F(2x2) U at
// ResNeXt-50's stage 4, where this measured 0.98-1.02 against 1.05-1.17 ms in an interleaved A/B).
template <typename scalar_t>
struct WinogradWeights {
  const float* packed;                   // all groups, or null
  const WinogradPackArgs<scalar_t>* src;  // what winograd_pack_group transforms when packed is null
};

// Floats from one point's [CPG][CPG] block of U to the next's: one cache line more than the block, so that the
// alpha^2 stores of one vector of (ci, co) pairs in winograd_pack_group go to different L1 sets (with 32 channels
// per group a 4 KB stride had put all 36 of them in one set). A group's U is kPoints such blocks.
constexpr int64_t winograd_point_stride(int64_t cpg) { return cpg * cpg + 16; }

// y = G x for the three taps x0, x1, x2 of one kernel column or row (vectors across output channels), G the weight
// transform matrix of F(2x2, 3x3) (4 rows) or F(4x4, 3x3) (6 rows). F(2x2): x0, (x0 + x1 + x2) / 2,
// (x0 - x1 + x2) / 2, x2. F(4x4) (points 0, 1, -1, 1/2, -2, infinity; see kWinograd4BT): x0, (x0 + x1 + x2) / 3,
// (x1 - x0 - x2) / 3, -(16 x0 + 8 x1 + 4 x2) / 15, (x0 - 2 x1 + 4 x2) / 15, x2.
template <class F, class vec>
RK_ALWAYS_INLINE void winograd_weight_apply(vec x0, vec x1, vec x2, vec* y) {
  if constexpr (F::kTile == 2) {
    y[0] = x0;
    y[1] = 0.5f * (x0 + x1 + x2);
    y[2] = 0.5f * (x0 - x1 + x2);
    y[3] = x2;
  } else {
    constexpr float third = 1.0f / 3, fifteenth = 1.0f / 15;
    const vec a = x0 + x2;
    y[0] = x0;
    y[1] = third * (a + x1);
    y[2] = third * (x1 - a);
    y[3] = -fifteenth * (16 * x0 + 8 * x1 + 4 * x2);
    y[4] = fifteenth * (x0 - 2 * x1 + 4 * x2);
    y[5] = x2;
  }
}

// u[p][ci][co] = (G w G^T)[p] for w = weight[group * CPG + co][ci] * scale[co] (the 3x3 kernel, co local to the group):
// the weight transform of F for one group, p = row * alpha + column of the alpha x alpha transform domain (alpha =
// tile + 2). The kernels of a chunk of input channels are first gathered into k[ci][tap][co] through the weight's
// strides (consecutive ci innermost: contiguous reads of a channels_last weight), then transformed in registers on
// vectors of L output channels: G down the kernel's three columns, then along the alpha resulting rows, each point
// stored once. (It had been a loop of out-of-line calls on one row of CPG values each: 29% of the samples at
// ResNeXt-50's stage 4 on a Zen 5, where F(4x4) transforms 1024 x 32 kernels per call.)
template <class F, class V, int CPG, typename scalar_t>
RK_ALWAYS_INLINE void winograd_pack_group(const WinogradPackArgs<scalar_t>& a, int64_t grp, float* __restrict u) {
  using vec = typename V::vec;
  constexpr int L = V::kLanes, alpha = F::kTile + 2, CK = std::min(CPG, 8);
  constexpr int64_t PS = winograd_point_stride(CPG);
  static_assert(CPG % L == 0 && CPG % CK == 0);
  alignas(64) float k[CK][9][CPG];
  const float* scale = a.scale + grp * CPG;
  for (int ci0 = 0; ci0 < CPG; ci0 += CK) {
    for (int co = 0; co < CPG; ++co) {
      const scalar_t* w = a.w + (grp * CPG + co) * a.s_co + ci0 * a.s_ci;
      for (int tap = 0; tap < 9; ++tap) {
        const scalar_t* t = w + (tap / 3) * a.s_kh + (tap % 3) * a.s_kw;
        for (int i = 0; i < CK; ++i) k[i][tap][co] = static_cast<float>(t[i * a.s_ci]);
      }
    }
    for (int i = 0; i < CK; ++i) {
      for (int co = 0; co < CPG; co += L) {
        const vec s = vload<V>(scale + co);
        vec gw[alpha][3];  // (G w)[r][c]
        for (int c = 0; c < 3; ++c) {
          vec col[alpha];
          winograd_weight_apply<F>(vload<V>(k[i][c] + co) * s, vload<V>(k[i][3 + c] + co) * s,
                                   vload<V>(k[i][6 + c] + co) * s, col);
          for (int r = 0; r < alpha; ++r) gw[r][c] = col[r];
        }
        float* dst = u + (ci0 + i) * CPG + co;
        for (int r = 0; r < alpha; ++r) {
          vec y[alpha];
          winograd_weight_apply<F>(gw[r][0], gw[r][1], gw[r][2], y);
          for (int j = 0; j < alpha; ++j) vstore<V>(dst + (r * alpha + j) * PS, y[j]);
        }
      }
    }
  }
}

// winograd_pack_group for groups [g0, g1) into u (group g at u + g * points * CPG^2).
template <class F, class V, int CPG, typename scalar_t>
RK_ALWAYS_INLINE void winograd_pack_groups(const WinogradPackArgs<scalar_t>& a, int64_t g0, int64_t g1, float* u) {
  for (int64_t grp = g0; grp < g1; ++grp) winograd_pack_group<F, V, CPG>(a, grp, u + grp * F::kPoints * winograd_point_stride(CPG));
}

template <class V, int NV>
constexpr int winograd_tiles_per_block() {
  return std::min(kMaxWinogradTiles, V::kAccRegs / NV);
}

// m[t * CB + co] = sum_ci v[t * CB + ci] * u[ci * CPG + co] for TB tiles and NV vectors of output channels (v, u
// and m point at the group's and the channel block's first channel). Compile-time strides give every tile's
// broadcast a constant displacement, so the TB x NV accumulators and the NV weights are all the registers needed.
template <class V, int NV, int TB, int CPG, int CB>
RK_ALWAYS_INLINE void winograd_gemm(const float* __restrict v, const float* __restrict u, float* __restrict m) {
  using vec = typename V::vec;
  constexpr int L = V::kLanes;
  vec acc[TB][NV];
#pragma GCC unroll 24
  for (int t = 0; t < TB; ++t) {
#pragma GCC unroll 4
    for (int k = 0; k < NV; ++k) acc[t][k] = vec{};
  }
#pragma GCC unroll 2
  for (int ci = 0; ci < CPG; ++ci) {
    vec w[NV];
#pragma GCC unroll 4
    for (int k = 0; k < NV; ++k) w[k] = vload<V>(u + ci * CPG + k * L);
#pragma GCC unroll 24
    for (int t = 0; t < TB; ++t) {
      const float x = v[t * CB + ci];
#pragma GCC unroll 4
      for (int k = 0; k < NV; ++k) acc[t][k] += x * w[k];
    }
  }
#pragma GCC unroll 24
  for (int t = 0; t < TB; ++t) {
#pragma GCC unroll 4
    for (int k = 0; k < NV; ++k) vstore<V>(m + t * CB + k * L, acc[t][k]);
  }
}

// winograd_gemm on nt <= TB tiles: a microkernel of exactly that many, so the weights are still shared.
template <class V, int NV, int TB, int CPG, int CB>
RK_ALWAYS_INLINE void winograd_gemm_tail(int nt, const float* v, const float* u, float* m) {
  if constexpr (TB > 1) {
    if (nt == TB) return winograd_gemm<V, NV, TB, CPG, CB>(v, u, m);
    winograd_gemm_tail<V, NV, TB - 1, CPG, CB>(nt, v, u, m);
  } else {
    winograd_gemm<V, NV, 1, CPG, CB>(v, u, m);
  }
}

// Step 1 for tiles [t0, t0 + nt) of image n, the CB channels from c0: vbuf[(p * TB + t) * CB + c] = (B^T d B)[p].
// Tiles go by tile row. Along a row, neighbouring tiles share two input columns, so B^T is applied once per input
// column (4 loads, 4 adds) and the tile's 4x4 result only combines its 4 columns (16 adds): a sliding window of two
// columns carries over to the next tile. Input rows outside the image read as zeros (a zero stride into zero_input),
// and so do columns outside it.
template <class V, int TB, int CB, typename scalar_t>
RK_ALWAYS_INLINE void winograd_input_transform(const BlockedProblem<scalar_t>& P, int64_t n, int64_t c0,
                                               int64_t tiles_w, int64_t t0, int nt, float* vbuf) {
  using vec = typename V::vec;
  constexpr int L = V::kLanes;
  const ConvGeom& g = *P.g;
  const scalar_t* image = P.in + n * g.H * g.W * g.C_in + c0;
  for (int t = 0; t < nt;) {
    const int64_t ty = (t0 + t) / tiles_w, tx0 = (t0 + t) % tiles_w;
    const int count = int(std::min<int64_t>(nt - t, tiles_w - tx0));  // tiles of this row in the block
    const int64_t iy0 = 2 * ty - g.pad_h, ix0 = 2 * tx0 - g.pad_w;
    const scalar_t* row[4];
    int64_t col_stride[4];
    for (int i = 0; i < 4; ++i) {
      const bool inside = iy0 + i >= 0 && iy0 + i < g.H;
      row[i] = inside ? image + (iy0 + i) * g.W * g.C_in : P.zero_input;
      col_stride[i] = inside ? g.C_in : 0;
    }
    // B^T applied to input column ix (rows iy0..iy0+3), channels c..c+L.
    const auto column = [&](int64_t ix, int c, vec (&r)[4]) {
      vec d[4];
      if (ix >= 0 && ix < g.W) {
        for (int i = 0; i < 4; ++i) d[i] = vload<V>(row[i] + ix * col_stride[i] + c);
      } else {
        for (int i = 0; i < 4; ++i) d[i] = vec{};
      }
      r[0] = d[0] - d[2], r[1] = d[1] + d[2], r[2] = d[2] - d[1], r[3] = d[1] - d[3];
    };
    for (int c = 0; c < CB; c += L) {
      vec a[4], b[4];
      column(ix0, c, a);
      column(ix0 + 1, c, b);
      for (int k = 0; k < count; ++k) {
        vec e[4], f[4];
        const int64_t ix = ix0 + 2 * k;
        column(ix + 2, c, e);
        column(ix + 3, c, f);
        float* dst = vbuf + int64_t(t + k) * CB + c;
        for (int i = 0; i < 4; ++i) {
          vstore<V>(dst + (i * 4 + 0) * TB * CB, a[i] - e[i]);
          vstore<V>(dst + (i * 4 + 1) * TB * CB, b[i] + e[i]);
          vstore<V>(dst + (i * 4 + 2) * TB * CB, e[i] - b[i]);
          vstore<V>(dst + (i * 4 + 3) * TB * CB, b[i] - f[i]);
          a[i] = e[i], b[i] = f[i];
        }
      }
    }
    t += count;
  }
}

// The output transforms' epilogue for the `cols` pixels y of output row oy of image n from column ox0, channels
// ch..ch+L: + shift, ReLU, store, and the training form's row statistics.
template <class V, typename scalar_t>
RK_ALWAYS_INLINE void winograd_store_row(const BlockedProblem<scalar_t>& P, const typename V::vec* y, int cols,
                                         typename V::vec shift, int64_t n, int64_t oy, int64_t ox0, int64_t ch) {
  using vec = typename V::vec;
  const ConvGeom& g = *P.g;
  scalar_t* out = P.out + ((n * g.OH + oy) * g.OW + ox0) * g.C_out + ch;
  for (int j = 0; j < cols; ++j) {
    vec r = y[j] + shift;
    if (P.relu) r = r < vec{} ? vec{} : r;  // NaN passes, as torch.relu
    vstore<V>(out + j * g.C_out, r);
  }
  if (P.row_stats) accumulate_row_stats_at<V, 1>(P, out, n * g.OH + oy, ox0, ch, cols);
}

// Step 3 for the same tiles: y = A^T m A + shift (ReLU), stored where inside the output.
template <class V, int TB, int CB, typename scalar_t, class Prefetch>
RK_ALWAYS_INLINE void winograd_output_transform(const BlockedProblem<scalar_t>& P, int64_t n, int64_t c0,
                                                int64_t tiles_w, int64_t t0, int nt, const float* mbuf,
                                                const Prefetch& pf, int step0) {
  using vec = typename V::vec;
  constexpr int L = V::kLanes;
  const ConvGeom& g = *P.g;
  for (int t = 0; t < nt; ++t) {
    pf.step(step0 + t);
    const int64_t ty = (t0 + t) / tiles_w, tx = (t0 + t) % tiles_w;
    const int64_t oy0 = 2 * ty, ox0 = 2 * tx;
    const int rows = int(std::min<int64_t>(2, g.OH - oy0)), cols = int(std::min<int64_t>(2, g.OW - ox0));
    for (int c = 0; c < CB; c += L) {
      vec m[4][4];
      for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 4; ++j) m[i][j] = vload<V>(mbuf + ((i * 4 + j) * TB + t) * CB + c);
      }
      vec s[2][4];
      for (int j = 0; j < 4; ++j) {
        s[0][j] = m[0][j] + m[1][j] + m[2][j];
        s[1][j] = m[1][j] - m[2][j] - m[3][j];
      }
      const vec shift = vload<V>(P.shift + c0 + c);
      for (int i = 0; i < rows; ++i) {
        const vec y[2] = {s[i][0] + s[i][1] + s[i][2], s[i][1] - s[i][2] - s[i][3]};
        winograd_store_row<V>(P, y, cols, shift, n, oy0 + i, ox0, c0 + c);
      }
    }
  }
}

// y = m x for a constant matrix m (B^T or A^T of F(4x4, 3x3)) on vectors: with the loops unrolled, its zero entries
// drop out and its +-1 entries become plain adds.
template <int R, int C, class vec>
RK_ALWAYS_INLINE void winograd_apply(const float (&m)[R][C], const vec* x, vec* y) {
#pragma GCC unroll 6
  for (int i = 0; i < R; ++i) {
    vec acc{};
    bool first = true;
#pragma GCC unroll 6
    for (int j = 0; j < C; ++j) {
      const float c = m[i][j];
      if (c == 0.f) continue;
      if (first) {
        acc = c == 1.f ? x[j] : c == -1.f ? -x[j] : c * x[j];
        first = false;
      } else if (c == 1.f) {
        acc += x[j];
      } else if (c == -1.f) {
        acc -= x[j];
      } else {
        acc += c * x[j];
      }
    }
    y[i] = acc;
  }
}

// F(4x4, 3x3) step 1 for tiles [t0, t0 + nt) of image n, the CB channels from c0: vbuf[(p * TB + t) * CB + c] =
// (B^T d B)[p], p = 6 * row + column of the 6x6 transform domain. As in winograd_input_transform, B^T is applied
// once per input column (neighbouring tiles of a tile row share two of their six columns); the columns' results
// go to a ring of six slots in L1 (six columns of six vectors do not fit the registers with the rest), and each
// of the tile's six rows is then transformed from the six slots it spans.
template <class V, int TB, int CB, typename scalar_t>
RK_ALWAYS_INLINE void winograd4_input_transform(const BlockedProblem<scalar_t>& P, int64_t n, int64_t c0,
                                                int64_t tiles_w, int64_t t0, int nt, float* vbuf) {
  using vec = typename V::vec;
  constexpr int L = V::kLanes;
  const ConvGeom& g = *P.g;
  const scalar_t* image = P.in + n * g.H * g.W * g.C_in + c0;
  alignas(64) float ring[6][6 * L];  // slot = column % 6: B^T of that input column, rows 0..5
  for (int t = 0; t < nt;) {
    const int64_t ty = (t0 + t) / tiles_w, tx0 = (t0 + t) % tiles_w;
    const int count = int(std::min<int64_t>(nt - t, tiles_w - tx0));  // tiles of this row in the block
    const int64_t iy0 = 4 * ty - g.pad_h, ix0 = 4 * tx0 - g.pad_w;
    const scalar_t* row[6];
    int64_t col_stride[6];
    for (int i = 0; i < 6; ++i) {
      const bool inside = iy0 + i >= 0 && iy0 + i < g.H;
      row[i] = inside ? image + (iy0 + i) * g.W * g.C_in : P.zero_input;
      col_stride[i] = inside ? g.C_in : 0;
    }
    // B^T applied to input column ix0 + col (rows iy0..iy0+5), channels c..c+L, into its ring slot.
    const auto column = [&](int col, int c) {
      const int64_t ix = ix0 + col;
      vec d[6], r[6];
      if (ix >= 0 && ix < g.W) {
        for (int i = 0; i < 6; ++i) d[i] = vload<V>(row[i] + ix * col_stride[i] + c);
      } else {
        for (int i = 0; i < 6; ++i) d[i] = vec{};
      }
      winograd_apply(kWinograd4BT, d, r);
      float* slot = ring[col % 6];
      for (int i = 0; i < 6; ++i) vstore<V>(slot + i * L, r[i]);
    };
    for (int c = 0; c < CB; c += L) {
      column(0, c);
      column(1, c);
      for (int k = 0; k < count; ++k) {
        for (int j = 2; j < 6; ++j) column(4 * k + j, c);
        const float* cols[6];
        for (int j = 0; j < 6; ++j) cols[j] = ring[(4 * k + j) % 6];
        float* dst = vbuf + int64_t(t + k) * CB + c;
        for (int i = 0; i < 6; ++i) {
          vec x[6], y[6];
          for (int j = 0; j < 6; ++j) x[j] = vload<V>(cols[j] + i * L);
          winograd_apply(kWinograd4BT, x, y);
          for (int j = 0; j < 6; ++j) vstore<V>(dst + (i * 6 + j) * TB * CB, y[j]);
        }
      }
    }
    t += count;
  }
}

// F(4x4, 3x3) step 3: y = A^T m A + shift (ReLU), stored where inside the output, with row statistics as in
// winograd_output_transform. A^T goes down the six columns of m first (into 4 x 6 vectors in L1), then along the
// four resulting rows.
template <class V, int TB, int CB, typename scalar_t, class Prefetch>
RK_ALWAYS_INLINE void winograd4_output_transform(const BlockedProblem<scalar_t>& P, int64_t n, int64_t c0,
                                                 int64_t tiles_w, int64_t t0, int nt, const float* mbuf,
                                                 const Prefetch& pf, int step0) {
  using vec = typename V::vec;
  constexpr int L = V::kLanes;
  const ConvGeom& g = *P.g;
  alignas(64) float z[4][6 * L];  // z[r][j]: row r of A^T m for column j
  for (int t = 0; t < nt; ++t) {
    pf.step(step0 + t);
    const int64_t ty = (t0 + t) / tiles_w, tx = (t0 + t) % tiles_w;
    const int64_t oy0 = 4 * ty, ox0 = 4 * tx;
    const int rows = int(std::min<int64_t>(4, g.OH - oy0)), cols = int(std::min<int64_t>(4, g.OW - ox0));
    for (int c = 0; c < CB; c += L) {
      for (int j = 0; j < 6; ++j) {
        vec m[6], r[4];
        for (int i = 0; i < 6; ++i) m[i] = vload<V>(mbuf + ((i * 6 + j) * TB + t) * CB + c);
        winograd_apply(kWinograd4AT, m, r);
        for (int i = 0; i < 4; ++i) vstore<V>(z[i] + j * L, r[i]);
      }
      const vec shift = vload<V>(P.shift + c0 + c);
      for (int i = 0; i < rows; ++i) {
        vec x[6], y[4];
        for (int j = 0; j < 6; ++j) x[j] = vload<V>(z[i] + j * L);
        winograd_apply(kWinograd4AT, x, y);
        winograd_store_row<V>(P, y, cols, shift, n, oy0 + i, ox0, c0 + c);
      }
    }
  }
}

// Software prefetch while a tile block's GEMMs and output transform run: the input windows of the next block's tiles
// and the output pixels of this block's, the channels [c0, c0 + CB) of each pixel. In channels_last a tile's pixels
// are C_in (C_out) floats apart, and a 6-row window crosses a 4 KB page every few pixels, which the hardware
// prefetchers do not follow: in a profile at ResNeXt-50 stage 2 the first touches of input and output lines took a
// fifth of the kernel's time.
// The work is cut into units, one output row of a this-block tile or one input row of a next-block tile, spread
// evenly over the points' GEMMs and the output transform's tiles (step(k) issues the k-th share). Spreading the
// next block's input over the output transform too measured 1.03-1.06x faster at stage 2 than over the GEMMs
// alone (interleaved A/B), where the prefetch instructions had stalled on full miss buffers. On a Sapphire Rapids
// class Xeon, whose L2 streamer follows these accesses, the same prefetches cost time instead (without them:
// 1.03-1.11x faster at stage 2, 1.03-1.04x at stage 3 in inference, even at stage 4 and in training steps), so Intel
// CPUs run without (BlockedProblem::prefetch).
template <int S, int CB, typename scalar_t>
struct WinogradPrefetch {
  const BlockedProblem<scalar_t>* P;
  int64_t tiles_w;
  int64_t in_n, in_c0, in_t0;  // next block: image, channels, first tile
  int in_nt;                   // its tiles (0: none)
  int64_t out_n, out_c0, out_t0;
  int out_nt;
  int steps;  // the calls of step() the units are spread over (0: no prefetching)

  int units() const { return in_nt * (S + 2) + out_nt * S; }
  // The k-th of `steps` equal shares of the units.
  RK_ALWAYS_INLINE void step(int k) const {
    const int n = units();
    if (k < steps) prefetch_units(k * n / steps, (k + 1) * n / steps);
  }

  static RK_ALWAYS_INLINE void lines(const scalar_t* px) {
    constexpr int kLine = 64 / int(sizeof(scalar_t));
    for (int c = 0; c < CB; c += kLine) __builtin_prefetch(px + c);
  }

  RK_ALWAYS_INLINE void prefetch_units(int u0, int u1) const {
    const ConvGeom& g = *P->g;
    for (int u = u0; u < u1; ++u) {
      if (u >= out_nt * S) {  // an input row of a next-block tile
        const int v = u - out_nt * S;
        const int64_t t = in_t0 + v / (S + 2), ty = t / tiles_w, tx = t % tiles_w;
        const int64_t iy = S * ty - g.pad_h + v % (S + 2);
        if (iy < 0 || iy >= g.H) continue;
        const int64_t ix0 = std::max<int64_t>(0, S * tx - g.pad_w);
        const int64_t ix1 = std::min<int64_t>(g.W, S * tx - g.pad_w + S + 2);
        const scalar_t* row = P->in + ((in_n * g.H + iy) * g.W) * g.C_in + in_c0;
        for (int64_t ix = ix0; ix < ix1; ++ix) lines(row + ix * g.C_in);
      } else {  // an output row of a this-block tile
        const int64_t t = out_t0 + u / S, ty = t / tiles_w, tx = t % tiles_w;
        const int64_t oy = S * ty + u % S;
        if (oy >= g.OH) continue;
        const int64_t ox1 = std::min<int64_t>(g.OW, S * tx + S);
        const scalar_t* row = P->out + ((out_n * g.OH + oy) * g.OW) * g.C_out + out_c0;
        for (int64_t ox = S * tx; ox < ox1; ++ox) lines(row + ox * g.C_out);
      }
    }
  }
};

// Work items [begin, end) for CPG channels per group (in and out). A block is the CB = max(CPG, VT lanes) channels
// of CB / CPG consecutive groups; item = image * blocks + block when all groups' U fit kImageMajorWeightBytes (a
// thread then keeps one image's input and output in cache across blocks, and the U of all blocks with them), and
// item = block * N + image otherwise (a thread keeps one block's U across images). The transforms run on VT vectors
// across the block's channels, the GEMMs on NV vectors of VG (as wide as CPG where it is narrower than VT) per group.
// vbuf and mbuf hold F::kPoints * TB * CB floats each, ubuf CB / CPG * F::kPoints * winograd_point_stride(CPG) (the block's U when W.packed is
// null).
template <class F, class VT, class VG, int CPG, typename scalar_t>
RK_ALWAYS_INLINE void winograd_items(const BlockedProblem<scalar_t>& P, const WinogradWeights<scalar_t>& W, float* vbuf,
                                     float* mbuf, float* ubuf, int64_t begin, int64_t end) {
  constexpr int NV = std::min(VG::kMaxBroadcastVectors, CPG / VG::kLanes);
  constexpr int TB = winograd_tiles_per_block<VG, NV>();
  constexpr int CB = std::max(CPG, VT::kLanes);
  static_assert(CB % CPG == 0 && CB % VT::kLanes == 0 && CPG % (NV * VG::kLanes) == 0);
  const ConvGeom& g = *P.g;
  constexpr int S = F::kTile, NP = F::kPoints;
  constexpr int64_t PS = winograd_point_stride(CPG);
  const int64_t tiles_w = (g.OW + S - 1) / S, tiles = ((g.OH + S - 1) / S) * tiles_w, blocks = g.C_out / CB;
  const bool image_major = winograd_image_major<F>(g);
  // Equal blocks: 49 tiles at TB = 24 go as 17 + 16 + 16, not 24 + 24 + 1.
  const int64_t tile_blocks = (tiles + TB - 1) / TB, per_block = (tiles + tile_blocks - 1) / tile_blocks;
  int64_t ubuf_c0 = -1;  // the block whose U ubuf holds
  const auto item_block = [&](int64_t item) { return (image_major ? item % blocks : item / g.N) * CB; };
  const auto item_image = [&](int64_t item) { return image_major ? item / blocks : item % g.N; };
  for (int64_t item = begin; item < end; ++item) {
    const int64_t c0 = item_block(item), n = item_image(item);
    const float* u_block = W.packed ? W.packed + c0 / CPG * NP * PS : ubuf;
    if (!W.packed && ubuf_c0 != c0) {
      for (int j = 0; j < CB; j += CPG) winograd_pack_group<F, VG, CPG>(*W.src, (c0 + j) / CPG, ubuf + j / CPG * NP * PS);
      ubuf_c0 = c0;
    }
    for (int64_t t0 = 0; t0 < tiles; t0 += per_block) {
      const int nt = int(std::min(per_block, tiles - t0));
      if constexpr (S == 2) {
        winograd_input_transform<VT, TB, CB>(P, n, c0, tiles_w, t0, nt, vbuf);
      } else {
        winograd4_input_transform<VT, TB, CB>(P, n, c0, tiles_w, t0, nt, vbuf);
      }
      // Prefetch steps: one per GEMM, then one per tile of the output transform (this block's output lines come
      // first, in the GEMMs' steps, the next block's input after).
      WinogradPrefetch<S, CB, scalar_t> pf{&P, tiles_w, n, c0, t0 + nt, 0, n, c0, t0, nt,
                                           P.prefetch ? NP * (CB / CPG) + nt : 0};
      if (t0 + nt < tiles) {
        pf.in_nt = int(std::min(per_block, tiles - t0 - nt));
      } else if (item + 1 < end) {  // the next item's first block
        pf.in_n = item_image(item + 1), pf.in_c0 = item_block(item + 1), pf.in_t0 = 0;
        pf.in_nt = int(std::min(per_block, tiles));
      }
      for (int j = 0; j < CB; j += CPG) {
        const float* u = u_block + j / CPG * NP * PS;  // the group's [points][CPG][CPG]
        for (int p = 0; p < NP; ++p) {
          pf.step((j / CPG) * NP + p);  // this GEMM's share of the prefetch units
          for (int co = 0; co < CPG; co += NV * VG::kLanes) {
            winograd_gemm_tail<VG, NV, TB, CPG, CB>(nt, vbuf + p * TB * CB + j, u + p * PS + co,
                                                    mbuf + p * TB * CB + j + co);
          }
        }
      }
      if constexpr (S == 2) {
        winograd_output_transform<VT, TB, CB>(P, n, c0, tiles_w, t0, nt, mbuf, pf, NP * (CB / CPG));
      } else {
        winograd4_output_transform<VT, TB, CB>(P, n, c0, tiles_w, t0, nt, mbuf, pf, NP * (CB / CPG));
      }
    }
  }
}

}  // namespace cpu
}  // namespace rk
