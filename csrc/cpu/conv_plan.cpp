// The planner of the CPU convolution (conv_plan.h).
#include "cpu/conv_plan.h"

#include <ATen/Context.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "cpu/simd.h"

namespace rk {
namespace cpu {
namespace {

// Dense pointwise convolutions are GEMMs, which oneDNN blocks for the whole cache hierarchy (the broadcast kernel does
// not block the reduction): from 64 KB of weights they measured faster through oneDNN.
constexpr int64_t kPointwiseWeightBytesForAten = 64 * 1024;
// For the same reason, on AVX2 the broadcast path's shapes whose block of 2 vectors of output channels has more
// weights than an L1 cache holds (KH * KW * C_in/groups * 16 floats: 36 KB for a 3x3 kernel over 64 input channels
// per group) measured faster through oneDNN; 32 channels per group (18 KB) stay with the broadcast kernel.
constexpr int64_t kBroadcastBlockWeightBytesForAten = 32 * 1024;
// Narrowest group (in output channels) for which broadcasting inputs beats expanding them.
constexpr int64_t kBroadcastMinWidth = 16;
// Per-thread scratch budget (elements of the accumulation type) that sizes the column tiles.
constexpr int64_t kScratchBudget = 256 * 1024;
// F(4x4) tiles (N * ceil(OH / 4) * ceil(OW / 4)) from which F(4x4, 3x3) runs instead of F(2x2, 3x3): its GEMMs do
// 1.78x fewer multiply-adds, its weight transform 2.25x more, which a few tiles do not pay back.
constexpr int64_t kWinograd4MinTiles = 8;
// Winograd work items go image by image while the transformed weights of all groups, points * C_in * C_out / groups
// floats, fit in this many bytes (about an L2), block by block beyond (a thread then keeps one block's U).
constexpr int64_t kImageMajorWeightBytes = 1024 * 1024;
// Where one channels_last input pixel spans a whole 4 KB page, no hardware prefetcher follows the Winograd path's
// accesses across pages: it prefetches in software there, and on every CPU but Intel's (whose L2 streamer follows
// the accesses within a page).
constexpr int64_t kPageBytes = 4096;
// Weight gradient: fewest output pixels per partial sum, the most partial-sum elements a call may allocate, and
// output channels per task of the generic kernel.
constexpr int64_t kWgradChunkPixels = 1024;
constexpr int64_t kWgradPartialBudget = int64_t(16) << 20;
constexpr int64_t kWgradGenericBlock = 64;

// Scope names: "resnext_kernels::" + name.
constexpr const char* kPathScopes[] = {
    "resnext_kernels::onednn_1x1",    "resnext_kernels::onednn_large_block", "resnext_kernels::onednn_intel",
    "resnext_kernels::winograd_f4x4", "resnext_kernels::winograd_f2x2",      "resnext_kernels::lanes",
    "resnext_kernels::broadcast",     "resnext_kernels::expand",             "resnext_kernels::generic",
};
constexpr const char* kDataGradScopes[] = {"resnext_kernels::dgrad_aten", "resnext_kernels::dgrad_lanes",
                                           "resnext_kernels::dgrad_winograd_f4x4"};
constexpr const char* kWeightGradScopes[] = {"resnext_kernels::wgrad_aten", "resnext_kernels::wgrad_lanes",
                                             "resnext_kernels::wgrad_broadcast", "resnext_kernels::wgrad_expand",
                                             "resnext_kernels::wgrad_generic"};
constexpr size_t kScopePrefix = sizeof("resnext_kernels::") - 1;

bool vector_dtype(at::ScalarType dtype) { return dtype == at::kFloat || dtype == at::kBFloat16; }

int isa_lanes(CpuIsa isa) {
  return isa == CpuIsa::kAvx512 ? Avx512Vec::kLanes : isa == CpuIsa::kAvx2 ? Avx2Vec::kLanes : 0;
}

// The Winograd path for float32/bfloat16 on AVX2/AVX-512: 3x3 kernels, stride 1, dilation 1, and 8, 16, 32 or 64
// channels per group in and out. AVX-512 transforms 16 channels at once (two groups of 8 when the group count is
// even), otherwise 8. Returns the transform width (0: the path does not apply) and sets the tile.
int winograd_lanes(const ConvGeom& g, CpuIsa isa, int* tile) {
  const int64_t cpg = g.C_in / g.groups;
  if (isa == CpuIsa::kBaseline || g.KH != 3 || g.KW != 3 || g.stride_h != 1 || g.stride_w != 1 || g.dil_h != 1 ||
      g.dil_w != 1 || g.C_out != g.C_in || (cpg != 8 && cpg != 16 && cpg != 32 && cpg != 64)) {
    return 0;
  }
  if (tile) *tile = g.N * ((g.OH + 3) / 4) * ((g.OW + 3) / 4) >= kWinograd4MinTiles ? 4 : 2;
  return isa == CpuIsa::kAvx2 ? 8 : cpg >= 16 || g.groups % 2 == 0 ? 16 : 8;
}

// The group width of the lanes path (float32/bfloat16 on AVX2/AVX-512), or 0 where it does not apply.
int lane_group_width(const ConvGeom& g, CpuIsa isa) {
  const int64_t c = g.C_in / g.groups;
  if (isa == CpuIsa::kBaseline || g.groups == 1 || g.C_out / g.groups != c || (c != 2 && c != 4 && c != 8) ||
      g.KW != kLaneKernelWidth || g.KH > kMaxVectorKernel) {
    return 0;
  }
  return g.C_in % isa_lanes(isa) == 0 ? int(c) : 0;
}

Tiling plan_tiling(const ConvGeom& g) {
  const int64_t cpg_in = g.C_in / g.groups, cpg_out = g.C_out / g.groups;
  Tiling t{};
  t.expand = g.groups > 1 && cpg_out < kBroadcastMinWidth;
  t.row_slots = int64_t(g.KH - 1) * g.dil_h + 1;
  // Per output column: the accumulator row, plus (expand) the cached expanded input columns.
  const int64_t per_col = g.C_out + (t.expand ? t.row_slots * g.stride_w * cpg_in * g.C_out : 0);
  t.tile_ow = std::clamp<int64_t>(kScratchBudget / std::max<int64_t>(per_col, 1), 1, g.OW);
  t.n_tiles = (g.OW + t.tile_ow - 1) / t.tile_ow;
  t.span = (t.tile_ow - 1) * g.stride_w + int64_t(g.KW - 1) * g.dil_w + 1;
  t.acc_size = t.tile_ow * g.C_out;
  t.expand_size = t.expand ? t.row_slots * t.span * cpg_in * g.C_out : 0;
  return t;
}

// Vectors per microkernel block for a block width (C_out in expand mode, C_out/groups in broadcast mode); 0 when the
// width is not a multiple of the vector width. Expand mode loads its inputs as FMA memory operands, so it takes 4 on
// every ISA; broadcast mode at most V::kMaxBroadcastVectors.
template <class V>
int vectors_per_block(int64_t width, bool expand) {
  for (int nv : {4, 2, 1}) {
    if (!expand && nv > V::kMaxBroadcastVectors) continue;
    if (width % (int64_t(nv) * V::kLanes) == 0) return nv;
  }
  return 0;
}

int blocked_vectors(const ConvGeom& g, const Tiling& tl, CpuIsa isa) {
  if (g.KH > kMaxVectorKernel || g.KW > kMaxVectorKernel) return 0;
  const int64_t width = tl.expand ? g.C_out : g.C_out / g.groups;
  switch (isa) {
    case CpuIsa::kAvx512: return vectors_per_block<Avx512Vec>(width, tl.expand);
    case CpuIsa::kAvx2: return vectors_per_block<Avx2Vec>(width, tl.expand);
    default: return 0;
  }
}

// The oneDNN route for this convolution, if any (routes on, float32, or bfloat16 on CPUs that multiply it natively:
// elsewhere oneDNN's bfloat16 convolutions are several times slower than float32, and the fused kernel widens to
// float32).
bool onednn_route(const ConvGeom& g, at::ScalarType dtype, CpuIsa isa, ConvPath* path) {
  if (!aten_routes_enabled()) return false;
  if (dtype != at::kFloat && !(dtype == at::kBFloat16 && cpu_info().native_bf16)) return false;
  if (g.groups == 1 && g.KH == 1 && g.KW == 1 && g.pad_h == 0 && g.pad_w == 0 &&
      g.C_in * g.C_out * int64_t(sizeof(float)) >= kPointwiseWeightBytesForAten) {
    *path = ConvPath::kOnednn1x1;
    return true;
  }
  const int64_t cpg_in = g.C_in / g.groups, cpg_out = g.C_out / g.groups;
  const bool broadcast = winograd_lanes(g, isa, nullptr) == 0 && lane_group_width(g, isa) == 0 &&
                         cpg_out >= kBroadcastMinWidth && cpg_out % Avx2Vec::kLanes == 0;
  if (!broadcast) return false;
  const int64_t block_weight_bytes = int64_t(g.KH) * g.KW * cpg_in * 2 * Avx2Vec::kLanes * int64_t(sizeof(float));
  if (isa == CpuIsa::kAvx2 && block_weight_bytes > kBroadcastBlockWeightBytesForAten) {
    *path = ConvPath::kOnednnLargeBlock;
    return true;
  }
  if (isa == CpuIsa::kAvx512 && cpu_is_intel() && g.KH * g.KW > 1) {
    *path = ConvPath::kOnednnIntel;
    return true;
  }
  return false;
}

// The stride-1 data gradient as a convolution of grad_y: input gy (OH x OW x C_out), output dx (H x W x C_in), the
// same kernel and dilation, padding dil * (K - 1) - pad (negative when the forward's padding exceeds the kernel's
// reach: then it is not a plain convolution).
ConvGeom data_grad_geometry(const ConvGeom& g) {
  ConvGeom t = g;
  t.H = g.OH, t.W = g.OW, t.C_in = g.C_out;
  t.OH = g.H, t.OW = g.W, t.C_out = g.C_in;
  t.pad_h = g.dil_h * (g.KH - 1) - g.pad_h;
  t.pad_w = g.dil_w * (g.KW - 1) - g.pad_w;
  return t;
}

template <class V>
void plan_wgrad_vectors(WgradPlan& p, const ConvGeom& g) {
  constexpr int L = V::kLanes;
  const int64_t cpg_out = g.C_out / g.groups, cpg_in = g.C_in / g.groups;
  if (g.groups > 1 && cpg_in == cpg_out && cpg_in >= 2 && (L % cpg_in == 0 || cpg_in % L == 0) && g.C_in % L == 0 &&
      g.KW == 3) {
    // The lanes kernel (wgrad_task_lanes, conv_wgrad.cpp): 3 taps x jt output channels of accumulators.
    p.jt = int(std::min<int64_t>(cpg_in, V::kAccRegs / 3 >= 8 ? 8 : 4));
    p.nv = 1;
    p.cb = L;
    return;
  }
  if (g.groups == 1 || cpg_out >= L) {
    if (cpg_out % L != 0) return;
    p.broadcast = true;
    p.nv = cpg_out % (2 * L) == 0 ? 2 : 1;
  } else {
    if (g.C_out % L != 0) return;
    p.broadcast = false;
    p.nv = g.C_out % (2 * L) == 0 ? 2 : 1;
  }
  p.cb = int64_t(p.nv) * L;
}

WgradPlan plan_wgrad(const ConvGeom& g, at::ScalarType dtype) {
  const CpuIsa isa = vector_dtype(dtype) ? detected_isa() : CpuIsa::kBaseline;
  WgradPlan p{};
  p.rows = g.N * g.OH;
  const int64_t cpg_in = g.C_in / g.groups;
  p.weight_size = int64_t(g.KH) * g.KW * cpg_in * g.C_out;
  p.rows_per_chunk = std::max<int64_t>(1, (kWgradChunkPixels + g.OW - 1) / g.OW);
  int64_t n_chunks = (p.rows + p.rows_per_chunk - 1) / p.rows_per_chunk;
  const int64_t max_chunks = std::max<int64_t>(1, kWgradPartialBudget / std::max<int64_t>(p.weight_size, 1));
  if (n_chunks > max_chunks) {
    p.rows_per_chunk = (p.rows + max_chunks - 1) / max_chunks;
    n_chunks = (p.rows + p.rows_per_chunk - 1) / p.rows_per_chunk;
  }
  p.rows_per_chunk = (p.rows + n_chunks - 1) / n_chunks;  // even chunks: tasks of one size balance across threads
  p.n_chunks = (p.rows + p.rows_per_chunk - 1) / p.rows_per_chunk;
  if (isa != CpuIsa::kBaseline && g.KH <= kMaxVectorKernel && g.KW <= kMaxVectorKernel) {
    if (isa == CpuIsa::kAvx512) plan_wgrad_vectors<Avx512Vec>(p, g);
    else plan_wgrad_vectors<Avx2Vec>(p, g);
  }
  if (p.nv == 0) {
    p.broadcast = false;
    p.cb = std::min<int64_t>(g.C_out, kWgradGenericBlock);
  }
  p.n_cblocks = (g.C_out + p.cb - 1) / p.cb;
  p.lanes = p.broadcast ? 1 : p.cb;
  p.span = (g.OW - 1) * g.stride_w + int64_t(g.KW - 1) * g.dil_w + 1;
  return p;
}

std::string kb(int64_t bytes) { return std::to_string(bytes / 1024) + " KB"; }

}  // namespace

const char* path_scope(ConvPath path) { return kPathScopes[int(path)]; }
const char* path_name(ConvPath path) { return path_scope(path) + kScopePrefix; }
const char* grad_scope(DataGradSource source) { return kDataGradScopes[int(source)]; }
const char* grad_name(DataGradSource source) { return grad_scope(source) + kScopePrefix; }
const char* grad_scope(WeightGradSource source) { return kWeightGradScopes[int(source)]; }
const char* grad_name(WeightGradSource source) { return grad_scope(source) + kScopePrefix; }

bool aten_routes_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("RESNEXT_KERNELS_CPU_ATEN_ROUTES");
    const std::string value = v == nullptr ? std::string() : std::string(v);
    TORCH_CHECK(value.empty() || value == "on" || value == "off",
                "RESNEXT_KERNELS_CPU_ATEN_ROUTES must be on or off (or unset), got '", value, "'");
    return value != "off";
  }();
  return enabled;
}

ConvPlan plan_cpu_conv(const ConvGeom& g, at::ScalarType dtype, ConvForm form) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16,
              "resnext_kernels (CPU kernel): input dtype must be float32, float64 or bfloat16, got ", dtype,
              " (resnext_kernels.ops routes other dtypes to ATen)");
  const CpuIsa isa = detected_isa();
  const bool vec = vector_dtype(dtype) && isa != CpuIsa::kBaseline;
  ConvPlan p{};
  p.dtype = dtype;
  p.form = form;
  p.geom = g;
  p.vec_lanes = isa_lanes(isa);
  if (vector_dtype(dtype) && g.N * g.C_in * g.H * g.W > 0 && onednn_route(g, dtype, isa, &p.path)) return p;
  if (g.KH == 1 && g.KW == 1 && g.stride_h == 1 && g.stride_w == 1 && g.pad_h == 0 && g.pad_w == 0 &&
      form != ConvForm::kTraining) {  // (row statistics need image rows: their per-row sums must stay short)
    p.geom.W = p.geom.OW = g.H * g.W;
    p.geom.H = p.geom.OH = 1;
    p.image_rows = true;
  }
  const ConvGeom& k = p.geom;
  int tile = 2;
  if (vec && form != ConvForm::kResidual && (p.winograd_lanes = winograd_lanes(k, isa, &tile)) > 0) {
    p.path = tile == 4 ? ConvPath::kWinogradF4x4 : ConvPath::kWinogradF2x2;
    const int64_t points = int64_t(tile + 2) * (tile + 2);
    p.winograd_image_major = points * k.C_in * (k.C_out / k.groups) * int64_t(sizeof(float)) <= kImageMajorWeightBytes;
    p.prefetch = !cpu_is_intel() || k.C_in * int64_t(c10::elementSize(dtype)) >= kPageBytes;
    return p;
  }
  if (vec && (p.lane_group = lane_group_width(k, isa)) > 0) {
    p.path = ConvPath::kLanes;
    p.stream = dtype == at::kFloat && p.vec_lanes == Avx512Vec::kLanes && form == ConvForm::kInference &&
               k.N * k.OH * k.OW * k.C_out * int64_t(sizeof(float)) >= kStreamOutputBytes;
    return p;
  }
  p.tiling = plan_tiling(k);
  p.vectors = vec ? blocked_vectors(k, p.tiling, isa) : 0;
  p.weight_block = k.C_out;
  if (p.vectors > 0) {
    p.path = p.tiling.expand ? ConvPath::kExpand : ConvPath::kBroadcast;
    if (!p.tiling.expand) p.weight_block = int64_t(p.vectors) * p.vec_lanes;
    return p;
  }
  p.path = ConvPath::kGeneric;
  return p;
}

// ATen's bfloat16 CPU weight gradient returns garbage (huge values or NaN, varying call to call) for a 1-pixel-wide
// input at a column stride above 1 (tests/test_training.py): the project's kernel computes those.
static bool aten_weight_grad_wrong(const ConvGeom& g, at::ScalarType dtype) {
  return dtype == at::kBFloat16 && g.W == 1 && g.stride_w > 1;
}

GradPlan plan_cpu_conv_grads(const ConvGeom& g, at::ScalarType dtype) {
  GradPlan p{};
  p.data = DataGradSource::kAten;
  p.weight = WeightGradSource::kAten;
  p.data_geom = data_grad_geometry(g);
  if (g.stride_h == 1 && g.stride_w == 1 && p.data_geom.pad_h >= 0 && p.data_geom.pad_w >= 0) {
    p.data_plan = plan_cpu_conv(p.data_geom, dtype, ConvForm::kInference);
    if (p.data_plan.path == ConvPath::kLanes && g.C_in / g.groups <= 4) p.data = DataGradSource::kLanes;
    if (p.data_plan.path == ConvPath::kWinogradF4x4) p.data = DataGradSource::kWinogradF4x4;
  }
  const int64_t cpg_in = g.C_in / g.groups, cpg_out = g.C_out / g.groups;
  p.aten_weight_wrong = aten_weight_grad_wrong(g, dtype);
  const bool own_weight_grad = at::globalContext().deterministicAlgorithms() ||
                               (vector_dtype(dtype) && detected_isa() != CpuIsa::kBaseline && g.groups > 1 &&
                                cpg_in == cpg_out && cpg_in >= 2 && cpg_in <= 8 && g.C_in % 16 == 0 && g.KW == 3) ||
                               p.aten_weight_wrong;
  if (own_weight_grad) {
    p.wgrad = plan_wgrad(g, dtype);
    p.weight = p.wgrad.jt > 0    ? WeightGradSource::kLanes
               : p.wgrad.nv == 0 ? WeightGradSource::kGeneric
               : p.wgrad.broadcast ? WeightGradSource::kBroadcast
                                   : WeightGradSource::kExpand;
  }
  return p;
}

std::string describe(const ConvPlan& p) {
  const ConvGeom& g = p.geom;
  const int64_t cpg_in = g.C_in / g.groups, cpg_out = g.C_out / g.groups;
  const std::string after = ", then the BN affine (and residual, ReLU) in one pass over its output";
  switch (p.path) {
    case ConvPath::kOnednn1x1:
      return "a dense 1x1 convolution with >= 64 KB of weights is a GEMM, which oneDNN blocks for the caches: run "
             "by oneDNN" + after;
    case ConvPath::kOnednnLargeBlock:
      return "more weights per block of 16 output channels (" +
             kb(int64_t(g.KH) * g.KW * cpg_in * 2 * Avx2Vec::kLanes * int64_t(sizeof(float))) +
             ") than an L1 cache holds: run by oneDNN, which blocks the reduction for the caches" + after;
    case ConvPath::kOnednnIntel:
      return "16+ output channels per group and a kernel larger than 1x1 on an Intel AVX-512 CPU, where oneDNN "
             "measured faster than the broadcast kernel: run by oneDNN" + after;
    case ConvPath::kWinogradF4x4:
      return "3x3 stride-1 convolution as Winograd F(4x4, 3x3): 4x fewer multiply-adds, with a float32 error a few "
             "times that of direct summation (about 1e-6 of the output's scale)";
    case ConvPath::kWinogradF2x2:
      return "3x3 stride-1 convolution as Winograd F(2x2, 3x3) (fewer than 8 tiles of 4x4): 2.25x fewer "
             "multiply-adds, within a few float32 rounding steps of direct summation";
    case ConvPath::kLanes:
      return "groups of " + std::to_string(p.lane_group) +
             " channels in and out with a 3-wide kernel: input channels in the vector lanes, the sums reordered per "
             "output pixel";
    case ConvPath::kBroadcast:
      return std::to_string(cpg_out) + " output channels per group: each input value broadcast into a register "
             "block of " + std::to_string(p.weight_block) + " output channels";
    case ConvPath::kExpand:
      return std::to_string(cpg_out) + " output channels per group: the input columns expanded across all " +
             std::to_string(g.C_out) + " output channels, then register blocks of " +
             std::to_string(int64_t(p.vectors) * p.vec_lanes);
    case ConvPath::kGeneric:
      break;
  }
  if (!vector_dtype(p.dtype)) return "float64: the portable kernel (accumulation in float64)";
  if (p.vec_lanes == 0) return "no AVX2 on this CPU (or RESNEXT_KERNELS_CPU_ISA=baseline): the portable kernel";
  return std::to_string(p.tiling.expand ? g.C_out : cpg_out) + " output channels per " +
         (p.tiling.expand ? std::string("row") : std::string("group")) + " (not a multiple of " +
         std::to_string(p.vec_lanes) + ")" +
         (g.KH > kMaxVectorKernel || g.KW > kMaxVectorKernel ? " or a kernel larger than 16" : "") +
         ": the portable kernel";
}

std::string describe(const GradPlan& p) {
  std::string s = "conv data gradient from ";
  switch (p.data) {
    case DataGradSource::kLanes:
      s += "the lanes kernel run on grad_y (stride 1, groups of 2-4 channels)";
      break;
    case DataGradSource::kWinogradF4x4:
      s += "the Winograd F(4x4, 3x3) kernel run on grad_y (stride 1)";
      break;
    case DataGradSource::kAten:
      s += "ATen";
      break;
  }
  s += ", weight gradient from ";
  if (p.weight == WeightGradSource::kAten) return s + "ATen";
  s += std::string("the project's deterministic kernel (") + grad_name(p.weight) + ")";
  if (at::globalContext().deterministicAlgorithms()) return s + ": torch.use_deterministic_algorithms is on";
  if (p.aten_weight_wrong) {
    return s + ": ATen's bfloat16 weight gradient is wrong for a 1-pixel-wide input at column stride 2 or more";
  }
  return s + ": groups of 2-8 channels, where it measured at least as fast as oneDNN";
}

std::vector<std::pair<std::string, int64_t>> parameters(const ConvPlan& p) {
  std::vector<std::pair<std::string, int64_t>> out;
  if (p.image_rows) out.emplace_back("image_rows", 1);
  switch (p.path) {
    case ConvPath::kWinogradF4x4:
    case ConvPath::kWinogradF2x2:
      out.emplace_back("tile", p.path == ConvPath::kWinogradF4x4 ? 4 : 2);
      out.emplace_back("lanes", p.winograd_lanes);
      out.emplace_back("image_major", p.winograd_image_major);
      out.emplace_back("prefetch", p.prefetch);
      break;
    case ConvPath::kLanes:
      out.emplace_back("group", p.lane_group);
      out.emplace_back("lanes", p.vec_lanes);
      out.emplace_back("stream", p.stream);
      break;
    case ConvPath::kBroadcast:
    case ConvPath::kExpand:
      out.emplace_back("lanes", p.vec_lanes);
      out.emplace_back("vectors", p.vectors);
      out.emplace_back("tile_ow", p.tiling.tile_ow);
      break;
    case ConvPath::kGeneric:
      out.emplace_back("tile_ow", p.tiling.tile_ow);
      out.emplace_back("expand", p.tiling.expand);
      break;
    default:
      break;
  }
  return out;
}

}  // namespace cpu
}  // namespace rk
