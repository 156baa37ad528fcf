// The broadcast and expand paths: their ISA entry points and runner; the kernels are in conv_broadcast.h and
// conv_expand.h, over the microkernel of conv_microkernel.h.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <memory>
#include <vector>

#include "cpu/conv_broadcast.h"
#include "cpu/conv_expand.h"
#include "cpu/conv_kernels.h"

namespace rk {
namespace cpu {
namespace {

template <class V, typename scalar_t>
RK_ALWAYS_INLINE void rows_dispatch(const ConvProblem<scalar_t>& P, MicrokernelScratch& S, int nv, int64_t row_begin,
                                    int64_t row_end) {
#define RK_VECTORS_CASE(NV)                                  \
  case NV:                                                   \
    if (P.expand)                                            \
      expand_rows<V, NV>(P, S, row_begin, row_end);          \
    else                                                     \
      broadcast_rows<V, NV>(P, S, row_begin, row_end);       \
    break;
  switch (nv) {
    RK_VECTORS_CASE(4)
    RK_VECTORS_CASE(2)
    RK_VECTORS_CASE(1)
    default:
      break;
  }
#undef RK_VECTORS_CASE
}

#if RK_X86_DISPATCH
// One entry point per (ISA, dtype); the always_inline templates below them get each ISA's code.
#define RK_DEFINE_ROWS(NAME, TARGET, VEC, scalar_t)                                                             \
  __attribute__((target(TARGET))) void NAME(const ConvProblem<scalar_t>& P, MicrokernelScratch& S, int nv,     \
                                            int64_t row_begin, int64_t row_end) {                             \
    rows_dispatch<VEC>(P, S, nv, row_begin, row_end);                                                         \
  }
RK_DEFINE_ROWS(vector_rows_avx512, "arch=x86-64-v4", Avx512Vec, float)
RK_DEFINE_ROWS(vector_rows_avx512, "arch=x86-64-v4", Avx512Vec, c10::BFloat16)
RK_DEFINE_ROWS(vector_rows_avx2, "arch=x86-64-v3", Avx2Vec, float)
RK_DEFINE_ROWS(vector_rows_avx2, "arch=x86-64-v3", Avx2Vec, c10::BFloat16)
#undef RK_DEFINE_ROWS
#endif

template <typename scalar_t>
void run(const ConvCall& c) {
  const ConvPlan& plan = c.plan;
  const ConvGeom& g = plan.geom;
  const Tiling& tl = plan.tiling;
  const int nv = plan.vectors;
  const int64_t cpg_in = g.C_in / g.groups;
  const at::Tensor shift = c.shift.contiguous();
  const std::vector<int64_t> src_channel = group_source_channels(g);
  // The broadcast path's weights in blocks of its nv vectors (see ConvProblem::w_ci_stride); else one row per tap
  // and input channel.
  const int64_t w_block = plan.weight_block;
  const std::vector<float> wp = pack_weight<scalar_t, float>(g, c.weight, c.scale, w_block);
  const std::vector<float> zero_expanded(tl.expand ? cpg_in * g.C_out : 0, 0.f);
  const std::vector<scalar_t> zero_input(g.C_in, scalar_t(0));
  const ConvProblem<scalar_t> P{&g, tl.tile_ow, tl.span, tl.n_tiles, tl.row_slots, tl.expand,
                                c.input.data_ptr<scalar_t>(), wp.data(), shift.data_ptr<float>(),
                                src_channel.data(), c.out.data_ptr<scalar_t>(),
                                c.residual ? c.residual->data_ptr<scalar_t>() : nullptr, c.relu,
                                zero_expanded.data(), zero_input.data(), static_cast<float*>(c.row_stats), w_block};
  at::parallel_for(0, g.N * g.OH, row_grain(g), [&](int64_t begin, int64_t end) {
    std::vector<float> expanded(tl.expand_size);
    std::vector<int64_t> slot_tag(tl.row_slots, -1);
    const int64_t table_pixels = tl.expand ? kMaxPixelsPerBlock : broadcast_band_rows<scalar_t>(g) * g.OW;
    std::vector<const void*> src(table_pixels * g.KH * g.KW);
    // Not zero-filled: broadcast_rows writes what it reads (a few hundred KB per thread).
    const int64_t packed_elements = tl.expand ? 0 : broadcast_packed_elements<scalar_t>(g);
    const auto packed = std::make_unique_for_overwrite<scalar_t[]>(packed_elements);
    MicrokernelScratch S{expanded.data(), slot_tag.data(), src.data(), packed_elements ? packed.get() : nullptr};
    RK_CALL_FOR_ISA(vector_rows, P, S, nv, begin, end);
  });
}

}  // namespace

void run_broadcast_expand(const ConvCall& c) {
  dispatch_vector_dtype(c.input.scalar_type(), [&](auto t) { run<decltype(t)>(c); });
}

}  // namespace cpu
}  // namespace rk
