// The Winograd paths (winograd_f4x4, winograd_f2x2): their ISA entry points and runner; the algorithm is in
// conv_winograd.h.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

#include "cpu/conv_kernels.h"
#include "cpu/conv_winograd.h"

namespace rk {
namespace cpu {
namespace {

#if RK_X86_DISPATCH
// One case of a switch on the channels per group: `return CALL<F, VT, VG, CPG> ARGS;`.
#define RK_WINOGRAD_CASE(CALL, ARGS, F, VT, VG, CPG) \
  case CPG: return CALL<F, VT, VG, CPG> ARGS;
// CALL for `cpg` channels per group, transforms on VT vectors, GEMMs on VG vectors (VG8 for groups of 8).
#define RK_WINOGRAD_SWITCH(NAME, CALL, ARGS, F, VT, VG8, VG)                              \
  switch (cpg) {                                                                          \
    RK_WINOGRAD_CASE(CALL, ARGS, F, VT, VG8, 8)                                           \
    RK_WINOGRAD_CASE(CALL, ARGS, F, VT, VG, 16)                                           \
    RK_WINOGRAD_CASE(CALL, ARGS, F, VT, VG, 32)                                           \
    RK_WINOGRAD_CASE(CALL, ARGS, F, VT, VG, 64)                                           \
    default: TORCH_INTERNAL_ASSERT(false, NAME ": unexpected channels per group ", cpg); \
  }

// Entry points: `lanes` is the transform vector width and `tile` the output tile size (2 or 4) the plan picked, cpg
// the channels per group.
#define RK_ITEMS_ARGS (P, W, vbuf, mbuf, ubuf, begin, end)
template <typename scalar_t>
__attribute__((target("arch=x86-64-v4"))) void winograd_items_avx512(const ConvProblem<scalar_t>& P,
                                                                     const WinogradWeights<scalar_t>& W, float* vbuf,
                                                                     float* mbuf, float* ubuf, int lanes, int tile,
                                                                     int cpg, int64_t begin, int64_t end) {
  if (tile == 4) {
    if (lanes == 8) return winograd_items<WinogradF4, Avx512YmmVec, Avx512YmmVec, 8> RK_ITEMS_ARGS;
    RK_WINOGRAD_SWITCH("winograd_items_avx512", winograd_items, RK_ITEMS_ARGS, WinogradF4, Avx512Vec, Avx512YmmVec,
                       Avx512Vec)
  }
  if (lanes == 8) return winograd_items<WinogradF2, Avx512YmmVec, Avx512YmmVec, 8> RK_ITEMS_ARGS;
  RK_WINOGRAD_SWITCH("winograd_items_avx512", winograd_items, RK_ITEMS_ARGS, WinogradF2, Avx512Vec, Avx512YmmVec,
                     Avx512Vec)
}
template <typename scalar_t>
__attribute__((target("arch=x86-64-v3"))) void winograd_items_avx2(const ConvProblem<scalar_t>& P,
                                                                   const WinogradWeights<scalar_t>& W, float* vbuf,
                                                                   float* mbuf, float* ubuf, int /*lanes*/, int tile,
                                                                   int cpg, int64_t begin, int64_t end) {
  if (tile == 4) {
    RK_WINOGRAD_SWITCH("winograd_items_avx2", winograd_items, RK_ITEMS_ARGS, WinogradF4, Avx2Vec, Avx2Vec, Avx2Vec)
  }
  RK_WINOGRAD_SWITCH("winograd_items_avx2", winograd_items, RK_ITEMS_ARGS, WinogradF2, Avx2Vec, Avx2Vec, Avx2Vec)
}
#undef RK_ITEMS_ARGS

// The weight transform of all blocks in [b0, b1) (image-major order; see WinogradWeights), with the vectors that
// winograd_items's transforms and GEMMs use.
#define RK_PACK_ARGS (a, b0, b1, u)
template <typename scalar_t>
__attribute__((target("arch=x86-64-v4"))) void winograd_pack_avx512(const WinogradPackArgs<scalar_t>& a, int lanes,
                                                                    int tile, int cpg, int64_t b0, int64_t b1,
                                                                    float* u) {
  if (tile == 4) {
    if (lanes == 8) return winograd_pack_ublocks<WinogradF4, Avx512YmmVec, Avx512YmmVec, 8> RK_PACK_ARGS;
    RK_WINOGRAD_SWITCH("winograd_pack_avx512", winograd_pack_ublocks, RK_PACK_ARGS, WinogradF4, Avx512Vec,
                       Avx512YmmVec, Avx512Vec)
  }
  if (lanes == 8) return winograd_pack_ublocks<WinogradF2, Avx512YmmVec, Avx512YmmVec, 8> RK_PACK_ARGS;
  RK_WINOGRAD_SWITCH("winograd_pack_avx512", winograd_pack_ublocks, RK_PACK_ARGS, WinogradF2, Avx512Vec,
                     Avx512YmmVec, Avx512Vec)
}
template <typename scalar_t>
__attribute__((target("arch=x86-64-v3"))) void winograd_pack_avx2(const WinogradPackArgs<scalar_t>& a, int /*lanes*/,
                                                                  int tile, int cpg, int64_t b0, int64_t b1,
                                                                  float* u) {
  if (tile == 4) {
    RK_WINOGRAD_SWITCH("winograd_pack_avx2", winograd_pack_ublocks, RK_PACK_ARGS, WinogradF4, Avx2Vec, Avx2Vec,
                       Avx2Vec)
  }
  RK_WINOGRAD_SWITCH("winograd_pack_avx2", winograd_pack_ublocks, RK_PACK_ARGS, WinogradF2, Avx2Vec, Avx2Vec, Avx2Vec)
}
#undef RK_PACK_ARGS
#undef RK_WINOGRAD_SWITCH
#undef RK_WINOGRAD_CASE
#endif

template <typename scalar_t>
void run(const ConvCall& c) {
  const ConvPlan& plan = c.plan;
  const ConvGeom& g = plan.geom;
  const int64_t cpg_in = g.C_in / g.groups;
  const at::Tensor shift = c.shift.contiguous();
  const at::Tensor scale = c.scale.contiguous();
  const at::Tensor& weight = c.weight;
  const WinogradPackArgs<scalar_t> pack{weight.data_ptr<scalar_t>(), weight.stride(0), weight.stride(1),
                                        weight.stride(2),          weight.stride(3), scale.data_ptr<float>()};
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
  ConvProblem<scalar_t> P{};
  P.g = &g, P.in = c.input.data_ptr<scalar_t>(), P.shift = shift.data_ptr<float>();
  P.out = c.out.data_ptr<scalar_t>(), P.relu = c.relu;
  P.zero_input = zero_input.data(), P.row_stats = static_cast<float*>(c.row_stats);
  P.prefetch = plan.prefetch;
  at::parallel_for(0, blocks * g.N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> vbuf(points * kMaxWinogradTiles * block);
    std::vector<float> mbuf(points * kMaxWinogradTiles * block);
    std::vector<float> ubuf(u.empty() ? ublock_floats : 0);
    RK_CALL_FOR_ISA(winograd_items, P, W, vbuf.data(), mbuf.data(), ubuf.data(), plan.winograd_lanes, tile,
                    int(cpg_in), begin, end);
  });
}

}  // namespace

void run_winograd(const ConvCall& c) {
  TORCH_INTERNAL_ASSERT(c.residual == nullptr, "the Winograd path takes no residual");
  dispatch_vector_dtype(c.input.scalar_type(), [&](auto t) { run<decltype(t)>(c); });
}

}  // namespace cpu
}  // namespace rk
