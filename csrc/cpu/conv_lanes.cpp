// The lanes path: its ISA entry points, weight packing and runner; the kernel is in conv_lanes.h.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#include "cpu/conv_kernels.h"
#include "cpu/conv_lanes.h"

namespace rk {
namespace cpu {
namespace {

#if RK_X86_DISPATCH
#define RK_DEFINE_LANES(NAME, TARGET, VEC, scalar_t)                                                       \
  __attribute__((target(TARGET))) void NAME(const ConvProblem<scalar_t>& P, const scalar_t** tbl, int c, \
                                            int64_t row_begin, int64_t row_end) {                        \
    lane_rows_dispatch<VEC>(P, tbl, c, row_begin, row_end);                                              \
  }
RK_DEFINE_LANES(lane_rows_avx512, "arch=x86-64-v4", Avx512Vec, float)
RK_DEFINE_LANES(lane_rows_avx512, "arch=x86-64-v4", Avx512Vec, c10::BFloat16)
RK_DEFINE_LANES(lane_rows_avx2, "arch=x86-64-v3", Avx2Vec, float)
RK_DEFINE_LANES(lane_rows_avx2, "arch=x86-64-v3", Avx2Vec, c10::BFloat16)
#undef RK_DEFINE_LANES
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

template <typename scalar_t>
void run(const ConvCall& c) {
  const ConvPlan& plan = c.plan;
  const ConvGeom& g = plan.geom;
  const int L = plan.vec_lanes;
  const at::Tensor shift = c.shift.contiguous();
  const std::vector<float> wl = pack_lane_weight<scalar_t>(g, c.weight, c.scale, L);
  const std::vector<scalar_t> zero_input(g.C_in, scalar_t(0));
  scalar_t* out = c.out.data_ptr<scalar_t>();
  ConvProblem<scalar_t> P{};
  P.g = &g, P.in = c.input.data_ptr<scalar_t>(), P.wp = wl.data(), P.shift = shift.data_ptr<float>(), P.out = out;
  P.residual = c.residual ? c.residual->data_ptr<scalar_t>() : nullptr, P.relu = c.relu;
  P.zero_input = zero_input.data(), P.row_stats = static_cast<float*>(c.row_stats);
  // Streamed output (ConvProblem::stream) where the plan says so and the output is 64-byte aligned.
  P.stream = plan.stream && reinterpret_cast<uintptr_t>(out) % 64 == 0;
  const int group = plan.lane_group;
  at::parallel_for(0, g.N * g.OH, row_grain(g), [&](int64_t begin, int64_t end) {
    std::vector<const scalar_t*> tbl(int64_t(g.KH) * g.OW * kLaneKernelWidth);
    RK_CALL_FOR_ISA(lane_rows, P, tbl.data(), group, begin, end);
  });
}

}  // namespace

void run_lanes(const ConvCall& c) {
  dispatch_vector_dtype(c.input.scalar_type(), [&](auto t) { run<decltype(t)>(c); });
}

}  // namespace cpu
}  // namespace rk
