// Winograd path of the CPU fused conv kernel: 3x3 convolutions with stride 1 and dilation 1 whose groups have 8, 16,
// 32 or 64 channels in and out (ResNeXt-50 32x4d stages 2-4; dense 3x3 convolutions of up to 64 channels).
//
// F(2x2, 3x3) computes a 2x2 block of outputs from a 4x4 block of inputs with 16 multiplies per (input, output)
// channel pair instead of 36 (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016):
//   Y = A^T [ (G w G^T) .* (B^T d B) ] A
// with B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1] and
// A^T = [1 1 1 0; 0 1 -1 -1]. The weight transform U = G w G^T (BN scale folded in) is done once per call
// (winograd_pack_block). Per point p of the 4x4 transform domain, the products summed over a
// group's input channels are a small GEMM, M_p[tile][co] = sum_ci V_p[tile][ci] U_p[ci][co]: the direct
// convolution's 9 multiply-adds per (output pixel, ci, co) become 4 (2.25x fewer), for the price of the input and
// output transforms (adds only). All transform coefficients are 0, +-1 and 1/2, so the results stay within a few
// float32 rounding steps of the direct sum (the tests hold both to the same float64 reference tolerances).
//
// F(4x4, 3x3) (WinogradF4, from 8 tiles on: the planner's choice, conv_plan.cpp) computes a 4x4 block of outputs from a 6x6
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
//      microkernel (each V value broadcast, each U vector shared by the TB tiles) -> mbuf[p][tile][c]; on AVX-512,
//      two groups of 8 share 16-lane GEMMs (winograd_gemm_paired, channels interleaved; see winograd_paired);
//   3. output transform (winograd_output_transform, winograd4_output_transform) with the vector paths' epilogue
//      (winograd_store_row): shift, ReLU, store of the outputs inside the image, and row statistics for the
//      training form (a row's tiles come in order, so the first one sets the pivot). No residual: a call with one
//      takes the other paths (the bottleneck adds it to its last, 1x1, convolution).
// While a block's GEMMs and output transform run, software prefetches bring in the next block's input windows and
// this block's output lines (WinogradPrefetch). The GEMMs take most of the time, the two transforms most of the rest.
//
// Included by conv_winograd.cpp only (always_inline, compiled once per ISA entry point there).
#pragma once

#include "cpu/conv_problem.h"

namespace rk {
namespace cpu {

// The two tile sizes: F(2x2, 3x3) (4x4 input tiles, 16 transform points) and F(4x4, 3x3) (6x6 input tiles, 36 points).
struct WinogradF2 {
  static constexpr int kTile = 2, kPoints = 16;
};
struct WinogradF4 {
  static constexpr int kTile = 4, kPoints = 36;
};
// Tiles per block at most.
constexpr int kMaxWinogradTiles = 24;

// F(4x4, 3x3) from the interpolation points 0, 1, -1, 1/2, -2 and infinity: 2-3x less float32 error than the
// common 0, +-1, +-2 (1-2e-6 of the output scale at 8-64 channels per group against 3-5e-6; direct summation
// 3-9e-7), for a few more adds in the input transform (its rows are not pairwise symmetric).
// B^T and A^T hold only values exact in binary; G (the weight transform, winograd_weight_apply)
// has thirds and fifteenths.
inline constexpr float kWinograd4BT[6][6] = {
    {1, -1.5f, -2, 1.5f, 1, 0}, {0, -1, 0.5f, 2.5f, 1, 0},    {0, 1, -2.5f, 0.5f, 1, 0},
    {0, -2, -1, 2, 1, 0},       {0, 0.5f, -1, -0.5f, 1, 0},   {0, 1, -1.5f, -2, 1.5f, 1}};
inline constexpr float kWinograd4AT[4][6] = {
    {1, 1, 1, 1, 1, 0}, {0, 1, -1, 0.5f, -2, 0}, {0, 1, 1, 0.25f, 4, 0}, {0, 1, -1, 0.125f, -8, 1}};

// The weight transform's source: the conv weight read through its strides (a channels_last module's weight would
// otherwise be copied on every call), and the folded BN scale per output channel.
template <typename scalar_t>
struct WinogradPackArgs {
  const scalar_t* w;
  int64_t s_co, s_ci, s_kh, s_kw;
  const float* scale;
};

// The transformed weights U, block by block (a block: the CB channels winograd_items works on at a time; see
// winograd_ublock_floats): packed for all blocks before the work (image-major order, where every thread needs every
// block), or transformed block by block by the thread that works on the block (group-major order), into its own
// buffer: no pass writing and re-reading all groups' U (2 MB of F(2x2) U at ResNeXt-50's stage 4). The planner picks
// the order (ConvPlan::winograd_image_major); WinogradWeights::packed is set exactly in image-major order.
template <typename scalar_t>
struct WinogradWeights {
  const float* packed;                   // all blocks, or null
  const WinogradPackArgs<scalar_t>* src;  // what winograd_pack_ublock transforms when packed is null
};

// Floats from one point's [CIN][COUT] block of U to the next's: one cache line more than the block, so that the
// alpha^2 stores of one vector of (ci, co) pairs in winograd_pack_block go to different L1 sets (with 32 channels
// per group a 4 KB stride would put all 36 of them in one set).
constexpr int64_t winograd_point_stride(int64_t cin, int64_t cout) { return cin * cout + 16; }

// Paired groups: with 8 channels per group and 16-lane vectors (AVX-512), the two groups of a block share 16-lane
// GEMMs instead of running 8-lane ones each (half the FMAs, a gain where a 512-bit FMA is as fast as a 256-bit one).
// Channels are then interleaved in the transform domain, lane 2 i + s = channel i of the block's group s: the input
// transform stores V that way, so the two groups' values of one input channel are adjacent and one 64-bit broadcast
// gives the GEMM its multiplier (a, b, a, b, ...); U holds [ci][2 co + s]; the output transform de-interleaves its
// results before the epilogue.
template <class VT, int CPG>
constexpr bool winograd_paired() {
  return CPG == 8 && VT::kLanes == 16;
}
// Lane q of the interleaved order holds channel (q % 2) * 8 + q / 2 of the natural one.
template <class V>
RK_ALWAYS_INLINE typename V::vec winograd_interleave(typename V::vec v) {
  const typename V::ivec idx = {0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15};
  return __builtin_shuffle(v, idx);
}
template <class V>
RK_ALWAYS_INLINE typename V::vec winograd_deinterleave(typename V::vec v) {
  const typename V::ivec idx = {0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15};
  return __builtin_shuffle(v, idx);
}
template <bool ILV, class V>
RK_ALWAYS_INLINE typename V::vec winograd_interleave_if(typename V::vec v) {
  if constexpr (ILV) return winograd_interleave<V>(v);
  else return v;
}
// (p[0], p[1]) in every pair of lanes: an integer broadcast of the 64 bits (a float64 one could quiet a NaN pattern).
template <class V>
RK_ALWAYS_INLINE typename V::vec winograd_pair_broadcast(const float* p) {
  typedef long long qvec __attribute__((vector_size(sizeof(typename V::vec))));
  long long q;
  __builtin_memcpy(&q, p, sizeof q);
  return (typename V::vec)(qvec{} + q);
}

// Floats of one block's U: kPoints point blocks per group, or for paired groups kPoints [8][16] point blocks.
constexpr int64_t winograd_ublock_floats(int points, int64_t cpg, int64_t lanes) {
  return cpg == 8 && lanes == 16 ? points * winograd_point_stride(8, 16)
                                 : std::max<int64_t>(1, lanes / cpg) * points * winograd_point_stride(cpg, cpg);
}

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

// u[p][ci][co] = (G w G^T)[p] for w = weight[co0 + co][ci] * scale[co0 + co] (the 3x3 kernels of COUT output channels
// from co0, CIN input channels each): the weight transform of F, p = row * alpha + column of the alpha x alpha
// transform domain (alpha = tile + 2); with ILV the COUT = 16 output channels (two groups of 8) go to the
// interleaved lane order (winograd_paired). The kernels of a chunk of input channels are first gathered into
// k[ci][tap][co] through the weight's strides (consecutive ci innermost: contiguous reads of a channels_last weight),
// then transformed in registers on vectors of L output channels: G down the kernel's three columns, then along the
// alpha resulting rows, each point stored once (F(4x4) transforms 1024 x 32 kernels per call at ResNeXt-50's stage 4:
// no out-of-line call per row).
template <class F, class V, int CIN, int COUT, bool ILV, typename scalar_t>
RK_ALWAYS_INLINE void winograd_pack_block(const WinogradPackArgs<scalar_t>& a, int64_t co0, float* __restrict u) {
  using vec = typename V::vec;
  constexpr int L = V::kLanes, alpha = F::kTile + 2, CK = std::min(CIN, 8);
  constexpr int64_t PS = winograd_point_stride(CIN, COUT);
  static_assert(COUT % L == 0 && CIN % CK == 0 && (!ILV || COUT == L));
  alignas(64) float k[CK][9][COUT];
  const float* scale = a.scale + co0;
  for (int ci0 = 0; ci0 < CIN; ci0 += CK) {
    for (int co = 0; co < COUT; ++co) {
      const scalar_t* w = a.w + (co0 + co) * a.s_co + ci0 * a.s_ci;
      for (int tap = 0; tap < 9; ++tap) {
        const scalar_t* t = w + (tap / 3) * a.s_kh + (tap % 3) * a.s_kw;
        for (int i = 0; i < CK; ++i) k[i][tap][co] = static_cast<float>(t[i * a.s_ci]);
      }
    }
    for (int i = 0; i < CK; ++i) {
      for (int co = 0; co < COUT; co += L) {
        const vec s = vload<V>(scale + co);
        vec gw[alpha][3];  // (G w)[r][c]
        for (int c = 0; c < 3; ++c) {
          vec col[alpha];
          winograd_weight_apply<F>(vload<V>(k[i][c] + co) * s, vload<V>(k[i][3 + c] + co) * s,
                                   vload<V>(k[i][6 + c] + co) * s, col);
          for (int r = 0; r < alpha; ++r) gw[r][c] = col[r];
        }
        float* dst = u + (ci0 + i) * COUT + co;
        for (int r = 0; r < alpha; ++r) {
          vec y[alpha];
          winograd_weight_apply<F>(gw[r][0], gw[r][1], gw[r][2], y);
          for (int j = 0; j < alpha; ++j) {
            vstore<V>(dst + (r * alpha + j) * PS, winograd_interleave_if<ILV, V>(y[j]));
          }
        }
      }
    }
  }
}

// The U of the block of CB = max(CPG, VT lanes) channels from c0 (winograd_items's vectors), winograd_ublock_floats
// floats at u: one pair of groups interleaved, or CB / CPG groups one after the other.
template <class F, class VT, class VG, int CPG, typename scalar_t>
RK_ALWAYS_INLINE void winograd_pack_ublock(const WinogradPackArgs<scalar_t>& a, int64_t c0, float* u) {
  if constexpr (winograd_paired<VT, CPG>()) {
    winograd_pack_block<F, VT, 8, 16, true>(a, c0, u);
  } else {
    constexpr int CB = std::max(CPG, VT::kLanes);
    for (int j = 0; j < CB; j += CPG) {
      float* group_u = u + j / CPG * F::kPoints * winograd_point_stride(CPG, CPG);
      winograd_pack_block<F, VG, CPG, CPG, false>(a, c0 + j, group_u);
    }
  }
}

// winograd_pack_ublock for blocks [b0, b1) into u.
template <class F, class VT, class VG, int CPG, typename scalar_t>
RK_ALWAYS_INLINE void winograd_pack_ublocks(const WinogradPackArgs<scalar_t>& a, int64_t b0, int64_t b1, float* u) {
  constexpr int CB = std::max(CPG, VT::kLanes);
  constexpr int64_t n = winograd_ublock_floats(F::kPoints, CPG, VT::kLanes);
  for (int64_t b = b0; b < b1; ++b) winograd_pack_ublock<F, VT, VG, CPG>(a, b * CB, u + b * n);
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

// The paired groups' GEMM (winograd_paired): m[t * CB + q] = sum_ci v[t * CB + 2 ci + s(q)] u[ci * 16 + q] for TB
// tiles, 16-lane vectors in the interleaved order, one 64-bit broadcast of the two groups' ci values per tile and ci.
template <class V, int TB, int CB>
RK_ALWAYS_INLINE void winograd_gemm_paired(const float* __restrict v, const float* __restrict u, float* __restrict m) {
  using vec = typename V::vec;
  static_assert(V::kLanes == 16);
  vec acc[TB];
#pragma GCC unroll 24
  for (int t = 0; t < TB; ++t) acc[t] = vec{};
#pragma GCC unroll 2
  for (int ci = 0; ci < 8; ++ci) {
    const vec w = vload<V>(u + ci * 16);
#pragma GCC unroll 24
    for (int t = 0; t < TB; ++t) acc[t] += winograd_pair_broadcast<V>(v + t * CB + 2 * ci) * w;
  }
#pragma GCC unroll 24
  for (int t = 0; t < TB; ++t) vstore<V>(m + t * CB, acc[t]);
}

template <class V, int TB, int CB>
RK_ALWAYS_INLINE void winograd_gemm_paired_tail(int nt, const float* v, const float* u, float* m) {
  if constexpr (TB > 1) {
    if (nt == TB) return winograd_gemm_paired<V, TB, CB>(v, u, m);
    winograd_gemm_paired_tail<V, TB - 1, CB>(nt, v, u, m);
  } else {
    winograd_gemm_paired<V, 1, CB>(v, u, m);
  }
}

// Step 1 for tiles [t0, t0 + nt) of image n, the CB channels from c0: vbuf[(p * TB + t) * CB + c] = (B^T d B)[p].
// Tiles go by tile row. Along a row, neighbouring tiles share two input columns, so B^T is applied once per input
// column (4 loads, 4 adds) and the tile's 4x4 result only combines its 4 columns (16 adds): a sliding window of two
// columns carries over to the next tile. Input rows outside the image read as zeros (a zero stride into zero_input),
// and so do columns outside it.
template <class V, int TB, int CB, bool ILV, typename scalar_t>
RK_ALWAYS_INLINE void winograd_input_transform(const ConvProblem<scalar_t>& P, int64_t n, int64_t c0,
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
        const auto put = [&](int point, vec x) {
          vstore<V>(dst + point * TB * CB, winograd_interleave_if<ILV, V>(x));
        };
        for (int i = 0; i < 4; ++i) {
          put(i * 4 + 0, a[i] - e[i]);
          put(i * 4 + 1, b[i] + e[i]);
          put(i * 4 + 2, e[i] - b[i]);
          put(i * 4 + 3, b[i] - f[i]);
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
RK_ALWAYS_INLINE void winograd_store_row(const ConvProblem<scalar_t>& P, const typename V::vec* y, int cols,
                                         typename V::vec shift, int64_t n, int64_t oy, int64_t ox0, int64_t ch) {
  using vec = typename V::vec;
  const ConvGeom& g = *P.g;
  scalar_t* out = P.out + ((n * g.OH + oy) * g.OW + ox0) * g.C_out + ch;
  vec r[WinogradF4::kTile];  // cols <= the widest tile
  for (int j = 0; j < cols; ++j) {
    r[j] = y[j] + shift;
    if (P.relu) r[j] = r[j] < vec{} ? vec{} : r[j];  // NaN passes, as torch.relu
    vstore<V>(out + j * g.C_out, r[j]);
  }
  if (!P.row_stats) return;
  if constexpr (std::is_same_v<scalar_t, float>) {  // the stored values are r itself: no read-back
    accumulate_row_stats_of<V, 1>(P, [&](int p, int) { return r[p]; }, n * g.OH + oy, ox0, ch, cols);
  } else {
    accumulate_row_stats_at<V, 1>(P, out, n * g.OH + oy, ox0, ch, cols);
  }
}

// Step 3 for the same tiles: y = A^T m A + shift (ReLU), stored where inside the output.
template <class V, int TB, int CB, bool ILV, typename scalar_t, class Prefetch>
RK_ALWAYS_INLINE void winograd_output_transform(const ConvProblem<scalar_t>& P, int64_t n, int64_t c0,
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
        vec y[2] = {s[i][0] + s[i][1] + s[i][2], s[i][1] - s[i][2] - s[i][3]};
        if constexpr (ILV) {
          for (int j = 0; j < 2; ++j) y[j] = winograd_deinterleave<V>(y[j]);
        }
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
template <class V, int TB, int CB, bool ILV, typename scalar_t>
RK_ALWAYS_INLINE void winograd4_input_transform(const ConvProblem<scalar_t>& P, int64_t n, int64_t c0,
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
          for (int j = 0; j < 6; ++j) vstore<V>(dst + (i * 6 + j) * TB * CB, winograd_interleave_if<ILV, V>(y[j]));
        }
      }
    }
    t += count;
  }
}

// F(4x4, 3x3) step 3: y = A^T m A + shift (ReLU), stored where inside the output, with row statistics as in
// winograd_output_transform. A^T goes down the six columns of m first (into 4 x 6 vectors in L1), then along the
// four resulting rows.
template <class V, int TB, int CB, bool ILV, typename scalar_t, class Prefetch>
RK_ALWAYS_INLINE void winograd4_output_transform(const ConvProblem<scalar_t>& P, int64_t n, int64_t c0,
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
        if constexpr (ILV) {
          for (int j = 0; j < 4; ++j) y[j] = winograd_deinterleave<V>(y[j]);
        }
        winograd_store_row<V>(P, y, cols, shift, n, oy0 + i, ox0, c0 + c);
      }
    }
  }
}

// Software prefetch while a tile block's GEMMs and output transform run: the input windows of the next block's tiles
// and the output pixels of this block's, the channels [c0, c0 + CB) of each pixel. In channels_last a tile's pixels
// are C_in (C_out) floats apart, and a 6-row window crosses a 4 KB page every few pixels, which the hardware
// prefetchers do not follow, so the first touches of input and output lines would stall the kernel.
// The work is cut into units, one output row of a this-block tile or one input row of a next-block tile, spread
// evenly over the points' GEMMs and the output transform's tiles (step(k) issues the k-th share): issued over the
// GEMMs alone, the prefetch instructions stall on full miss buffers. Intel CPUs, whose L2 streamer follows these
// accesses, measured faster without them, except where an input pixel spans a whole page (ConvProblem::prefetch,
// set by the planner).
template <int S, int CB, typename scalar_t>
struct WinogradPrefetch {
  const ConvProblem<scalar_t>* P;
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
// vbuf and mbuf hold F::kPoints * TB * CB floats each, ubuf winograd_ublock_floats (the block's U when W.packed is
// null).
template <class F, class VT, class VG, int CPG, typename scalar_t>
RK_ALWAYS_INLINE void winograd_items(const ConvProblem<scalar_t>& P, const WinogradWeights<scalar_t>& W, float* vbuf,
                                     float* mbuf, float* ubuf, int64_t begin, int64_t end) {
  constexpr int NV = std::min(VG::kMaxBroadcastVectors, CPG / VG::kLanes);
  constexpr int TB = winograd_tiles_per_block<VG, NV>();
  constexpr int CB = std::max(CPG, VT::kLanes);
  constexpr bool PAIRED = winograd_paired<VT, CPG>();
  static_assert(CB % CPG == 0 && CB % VT::kLanes == 0 && CPG % (NV * VG::kLanes) == 0);
  static_assert(!PAIRED || TB <= winograd_tiles_per_block<VT, 1>());
  const ConvGeom& g = *P.g;
  constexpr int S = F::kTile, NP = F::kPoints;
  constexpr int64_t PS = winograd_point_stride(CPG, CPG);
  constexpr int64_t UBLOCK = winograd_ublock_floats(NP, CPG, VT::kLanes);
  constexpr int GEMMS = PAIRED ? NP : NP * (CB / CPG);  // GEMM calls per tile block
  const int64_t tiles_w = (g.OW + S - 1) / S, tiles = ((g.OH + S - 1) / S) * tiles_w, blocks = g.C_out / CB;
  const bool image_major = W.packed != nullptr;  // the planner's choice (ConvPlan::winograd_image_major)
  // Equal blocks: 49 tiles at TB = 24 go as 17 + 16 + 16, not 24 + 24 + 1.
  const int64_t tile_blocks = (tiles + TB - 1) / TB, per_block = (tiles + tile_blocks - 1) / tile_blocks;
  int64_t ubuf_c0 = -1;  // the block whose U ubuf holds
  const auto item_block = [&](int64_t item) { return (image_major ? item % blocks : item / g.N) * CB; };
  const auto item_image = [&](int64_t item) { return image_major ? item / blocks : item % g.N; };
  for (int64_t item = begin; item < end; ++item) {
    const int64_t c0 = item_block(item), n = item_image(item);
    const float* u_block = W.packed ? W.packed + c0 / CB * UBLOCK : ubuf;
    if (!W.packed && ubuf_c0 != c0) {
      winograd_pack_ublock<F, VT, VG, CPG>(*W.src, c0, ubuf);
      ubuf_c0 = c0;
    }
    for (int64_t t0 = 0; t0 < tiles; t0 += per_block) {
      const int nt = int(std::min(per_block, tiles - t0));
      if constexpr (S == 2) {
        winograd_input_transform<VT, TB, CB, PAIRED>(P, n, c0, tiles_w, t0, nt, vbuf);
      } else {
        winograd4_input_transform<VT, TB, CB, PAIRED>(P, n, c0, tiles_w, t0, nt, vbuf);
      }
      // Prefetch steps: one per GEMM, then one per tile of the output transform (this block's output lines come
      // first, in the GEMMs' steps, the next block's input after).
      WinogradPrefetch<S, CB, scalar_t> pf{&P, tiles_w, n, c0, t0 + nt, 0, n, c0, t0, nt, P.prefetch ? GEMMS + nt : 0};
      if (t0 + nt < tiles) {
        pf.in_nt = int(std::min(per_block, tiles - t0 - nt));
      } else if (item + 1 < end) {  // the next item's first block
        pf.in_n = item_image(item + 1), pf.in_c0 = item_block(item + 1), pf.in_t0 = 0;
        pf.in_nt = int(std::min(per_block, tiles));
      }
      if constexpr (PAIRED) {
        constexpr int64_t PS2 = winograd_point_stride(8, 16);
        for (int p = 0; p < NP; ++p) {
          pf.step(p);
          winograd_gemm_paired_tail<VT, TB, CB>(nt, vbuf + p * TB * CB, u_block + p * PS2, mbuf + p * TB * CB);
        }
      } else {
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
      }
      if constexpr (S == 2) {
        winograd_output_transform<VT, TB, CB, PAIRED>(P, n, c0, tiles_w, t0, nt, mbuf, pf, GEMMS);
      } else {
        winograd4_output_transform<VT, TB, CB, PAIRED>(P, n, c0, tiles_w, t0, nt, mbuf, pf, GEMMS);
      }
    }
  }
}

}  // namespace cpu
}  // namespace rk
