// Broadcast path of the CPU conv kernel: groups of 16+ output channels (and dense convolutions). Each input value is
// broadcast and multiplied into a register block of its group's output channels (conv_microkernel.h).
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/conv_microkernel.h"

namespace rk {
namespace cpu {

// Broadcast mode: the source pointers (group 0's first input channel, or `zeros` outside the image) of every pixel
// and tap of output rows [b0, b1), tbl[((row - b0) * OW + ow) * KH * KW + tap]; each channel block then adds its
// group's offset. pixel(n, ih, iw) gives the source of an input pixel inside the image.
template <typename scalar_t, class Pixel>
RK_ALWAYS_INLINE void broadcast_source_table(const ConvProblem<scalar_t>& P, const void** tbl, int64_t b0,
                                             int64_t b1, const scalar_t* zeros, const Pixel& pixel) {
  const ConvGeom& g = *P.g;
  const int64_t taps = int64_t(g.KH) * g.KW;
  for (int64_t row = b0; row < b1; ++row) {
    const int64_t n = row / g.OH, ih0 = (row % g.OH) * g.stride_h - g.pad_h;
    for (int64_t ow = 0; ow < g.OW; ++ow) {
      const void** t = tbl + ((row - b0) * g.OW + ow) * taps;
      for (int32_t kh = 0; kh < g.KH; ++kh) {
        const int64_t ih = ih0 + int64_t(kh) * g.dil_h;
        for (int32_t kw = 0; kw < g.KW; ++kw) {
          const int64_t iw = ow * g.stride_w - g.pad_w + int64_t(kw) * g.dil_w;
          const bool inside = ih >= 0 && ih < g.H && iw >= 0 && iw < g.W;
          t[int64_t(kh) * g.KW + kw] = static_cast<const void*>(inside ? pixel(n, ih, iw) : zeros);
        }
      }
    }
  }
}

// The input rows a band of output rows [b0, b1) reads, per image: rows [first_ih, first_ih + count) of image n0 + i
// sit from row base in the band's packed copy (broadcast_rows). At most kMaxBandImages images per band.
constexpr int64_t kMaxBandImages = 64;
struct BandInputRows {
  int64_t n0, n1;
  int64_t first_ih[kMaxBandImages], base[kMaxBandImages + 1];
};

inline BandInputRows band_input_rows(const ConvGeom& g, int64_t b0, int64_t b1) {
  BandInputRows r{};
  r.n0 = b0 / g.OH, r.n1 = (b1 - 1) / g.OH;
  r.base[0] = 0;
  for (int64_t n = r.n0; n <= r.n1; ++n) {
    const int64_t oh_a = n == r.n0 ? b0 % g.OH : 0, oh_b = n == r.n1 ? (b1 - 1) % g.OH : g.OH - 1;
    const int64_t ih_a = std::max<int64_t>(0, oh_a * g.stride_h - g.pad_h);
    const int64_t ih_b = std::min<int64_t>(g.H - 1, oh_b * g.stride_h - g.pad_h + int64_t(g.KH - 1) * g.dil_h);
    r.first_ih[n - r.n0] = ih_a;
    r.base[n - r.n0 + 1] = r.base[n - r.n0] + std::max<int64_t>(0, ih_b - ih_a + 1);
  }
  return r;
}

// Broadcast mode works on bands of output rows: input rows read about kBandInputBytes (a quarter of an L2), and
// at most kBandTablePointers source pointers.
constexpr int64_t kBandInputBytes = 256 * 1024;
constexpr int64_t kBandTablePointers = 32 * 1024;

// Output rows per band in broadcast mode (see broadcast_rows).
template <typename scalar_t>
inline int64_t broadcast_band_rows(const ConvGeom& g) {
  const int64_t in_bytes_per_row = std::max<int64_t>(1, g.stride_h * g.W * g.C_in * int64_t(sizeof(scalar_t)));
  const int64_t pointers_per_row = std::max<int64_t>(1, g.OW * g.KH * g.KW);
  return std::clamp<int64_t>(std::min(kBandInputBytes / in_bytes_per_row, kBandTablePointers / pointers_per_row), 1,
                             kMaxBandImages - 1);
}

// Elements of one group's part of the packed copy of a band's input (broadcast mode with groups > 1): each output
// row reads at most stride_h new input rows, each image of the band adds its kernel's halo, and one pixel of zeros
// at the end is where the group's out-of-image taps point.
template <typename scalar_t>
inline int64_t broadcast_packed_group_elements(const ConvGeom& g) {
  const int64_t band = broadcast_band_rows<scalar_t>(g);
  const int64_t rows = band * g.stride_h + (band + 1) * (int64_t(g.KH - 1) * g.dil_h + 1);
  return (rows * g.W + 1) * (g.C_in / g.groups);
}

// Elements of the whole packed copy, every group's part (0 without groups: no copy).
template <typename scalar_t>
inline int64_t broadcast_packed_elements(const ConvGeom& g) {
  return g.groups == 1 ? 0 : g.groups * broadcast_packed_group_elements<scalar_t>(g);
}

// Computes output rows [row_begin, row_end) (row = n * OH + oh) with blocks of NV vectors, band of rows by band of
// rows, and within a band channel block by channel block: a block's weights (up to 9 * 32 * 32 floats at ResNeXt-50's
// last stage) then stay in cache for all the band's rows instead of being streamed again for each row, the band's
// input rows stay in L2 for all the channel blocks, and the source pointers are computed once per band.
template <class V, int NV, typename scalar_t>
RK_ALWAYS_INLINE void broadcast_rows(const ConvProblem<scalar_t>& P, MicrokernelScratch& S, int64_t row_begin,
                                     int64_t row_end) {
  constexpr int CB = NV * V::kLanes;
  constexpr int TP = pixels_per_block<V, NV>();
  const ConvGeom& g = *P.g;
  const int64_t taps = int64_t(g.KH) * g.KW;
  bool row_ok[kMaxVectorKernel];
  const int64_t band = broadcast_band_rows<scalar_t>(g);
  const int64_t cpg_in = g.C_in / g.groups, cpg_out = g.C_out / g.groups;
  // With groups, the band's input is first copied into S.packed, one part per group ([group][row][iw][cpg_in], see
  // broadcast_packed_group_elements), and the table points into group 0's part; a channel block adds its group's
  // offset (the microkernel's src_offset). In place, a band's pixels are C_in elements apart (4 KB at 1024
  // channels), so the 30-odd pixels one block of a stride-2 row reads fall into one or two L1 sets and are refetched
  // from L2 for every input channel. The copy reads the band pixel by pixel, in memory order: copied one group at a
  // time, each of its pixels would be a line 2-4 KB from the last, which no prefetcher follows across pages.
  scalar_t* packed = static_cast<scalar_t*>(S.packed);
  const int64_t group_elems = packed ? broadcast_packed_group_elements<scalar_t>(g) : 0;
  const scalar_t* zeros = packed ? packed + group_elems - cpg_in : P.zero_input;
  if (packed) {
    for (int64_t grp = 1; grp <= g.groups; ++grp) {
      std::fill_n(packed + grp * group_elems - cpg_in, cpg_in, scalar_t(0));  // the parts' zero pixels
    }
  }
  for (int64_t b0 = row_begin; b0 < row_end; b0 += band) {
    const int64_t b1 = std::min(row_end, b0 + band);
    if (packed) {
      const BandInputRows in_rows = band_input_rows(g, b0, b1);
      for (int64_t n = in_rows.n0; n <= in_rows.n1; ++n) {
        const int64_t i = n - in_rows.n0;
        for (int64_t r = 0; r < in_rows.base[i + 1] - in_rows.base[i]; ++r) {
          const scalar_t* src_row = P.in + ((n * g.H + in_rows.first_ih[i] + r) * g.W) * g.C_in;
          scalar_t* dst_row = packed + (in_rows.base[i] + r) * g.W * cpg_in;
          for (int64_t iw = 0; iw < g.W; ++iw) {
            for (int64_t grp = 0; grp < g.groups; ++grp) {
              copy_channels(src_row + iw * g.C_in + grp * cpg_in, dst_row + grp * group_elems + iw * cpg_in, cpg_in);
            }
          }
        }
      }
      broadcast_source_table(P, S.src, b0, b1, zeros, [&](int64_t n, int64_t ih, int64_t iw) {
        const int64_t i = n - in_rows.n0;
        return packed + ((in_rows.base[i] + ih - in_rows.first_ih[i]) * g.W + iw) * cpg_in;
      });
    } else {
      broadcast_source_table(P, S.src, b0, b1, zeros, [&](int64_t n, int64_t ih, int64_t iw) {
        return P.in + ((n * g.H + ih) * g.W + iw) * g.C_in;
      });
    }
    // The band's pixels (rows b0..b1 are consecutive in the output, and so are their table entries) go in equal
    // blocks of up to TP that may span rows: 7-pixel rows in bands of two go as 5 + 5 + 4 rather than 4 + 3 + 4
    // + 3, and no row ends in a 1-pixel block (which loads its weights for one pixel's multiply-adds). A block's
    // taps are skipped only where they are outside the image for every row it spans; the table points the other
    // out-of-image taps at zeros.
    const int64_t npix = (b1 - b0) * g.OW, nblocks = (npix + TP - 1) / TP, per_block = (npix + nblocks - 1) / nblocks;
    scalar_t* out_band = P.out + b0 * g.OW * g.C_out;
    for (int64_t co0 = 0; co0 < g.C_out; co0 += CB) {
      const int64_t grp = co0 / cpg_out;  // the block's group
      const int64_t src_ch0 = packed ? grp * group_elems : grp * cpg_in;
      for (int64_t p0 = 0; p0 < npix; p0 += per_block) {
        const int np = int(std::min<int64_t>(per_block, npix - p0));
        const int64_t r0 = b0 + p0 / g.OW, r1 = b0 + (p0 + np - 1) / g.OW;
        for (int64_t r = r0; r <= r1; ++r) taps_inside(g, r, row_ok, r > r0);
        scalar_t* out = out_band + p0 * g.C_out + co0;
        microkernel_tail<V, NV, TP, false>(np, P, row_ok, S.src + p0 * taps, src_ch0, block_weights(P, co0),
                                           P.shift + co0, out);
      }
      if (P.row_stats) {  // per row, over the band's rows for these channels at once (still in L1)
        for (int64_t r = b0; r < b1; ++r) {
          accumulate_row_stats_at<V, NV>(P, out_band + (r - b0) * g.OW * g.C_out + co0, r, 0, co0, int(g.OW));
        }
      }
    }
  }
}

}  // namespace cpu
}  // namespace rk
