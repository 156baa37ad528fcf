// The planner of the CPU convolution: which path runs a convolution and with which parameters, and where the training
// backward takes its gradients from. The kernels dispatch on its plan (so the plan is what runs), explain() reports
// it through torch.ops.resnext_kernels._plan_conv, and every path's entry opens a profiler scope of its name.
//
// Forward paths, in the order the planner tries them:
//   onednn_1x1          dense 1x1 convolutions with >= 64 KB of weights: a GEMM, which oneDNN blocks for the caches
//   onednn_large_block  (AVX2) the broadcast path's shapes whose weight block exceeds an L1 cache
//   onednn_intel        (Intel AVX-512) the broadcast path's shapes with a kernel larger than 1x1
//   winograd_f4x4       3x3, stride 1, dilation 1, 8-64 channels per group in and out, from 8 F(4x4) tiles on
//   winograd_f2x2       the same shapes below 8 tiles
//   lanes               groups of 2, 4 or 8 channels in and out, 3-wide kernel: input channels in the vector lanes
//   broadcast           groups of >= 16 output channels (or dense): each input broadcast into a register block
//   expand              narrower groups: input columns expanded across all output channels first
//   generic             float64, CPUs without AVX2, widths that are not a multiple of the vector width
// The oneDNN routes run oneDNN's convolution, then the BN affine (and residual, ReLU) in one pass over its output.
// The vector paths (winograd, lanes, broadcast, expand) take float32 and bfloat16 on AVX2 or AVX-512 CPUs.
//
// Training backward (conv_bn_relu_train_backward): the data gradient from
//   dgrad_lanes, dgrad_winograd_f4x4   the forward kernel run on grad_y (stride 1), where its plan for the
//                                      transposed convolution is lanes with <= 4 channels per group, or F(4x4)
//   dgrad_aten                         ATen's convolution_backward
// and the weight gradient from
//   wgrad_lanes, wgrad_broadcast, wgrad_expand, wgrad_generic   the project's deterministic kernel (conv_wgrad.cpp),
//                                      under torch.use_deterministic_algorithms(True), or with groups of 2-8
//                                      channels in and out and a 3-wide kernel on AVX2/AVX-512
//   wgrad_aten                         ATen's convolution_backward
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "common/conv_geometry.h"
#include "cpu/isa.h"

namespace rk {
namespace cpu {

// Largest kernel height/width the vector kernels take (their per-row tables are on the stack).
constexpr int kMaxVectorKernel = 16;
// Kernel width the lanes path is unrolled for.
constexpr int kLaneKernelWidth = 3;
// Output size from which the lanes path streams its output past the caches (ConvProblem::stream): a few times an
// L2. An output that fits the caches is better left there for the next layer, which reads it.
constexpr int64_t kStreamOutputBytes = 4 << 20;

enum class ConvPath : uint8_t {
  kOnednn1x1,
  kOnednnLargeBlock,
  kOnednnIntel,
  kWinogradF4x4,
  kWinogradF2x2,
  kLanes,
  kBroadcast,
  kExpand,
  kGeneric,
};
enum class DataGradSource : uint8_t { kAten, kLanes, kWinogradF4x4 };
enum class WeightGradSource : uint8_t { kAten, kLanes, kBroadcast, kExpand, kGeneric };

// The path's name ("winograd_f4x4") and its profiler scope ("resnext_kernels::winograd_f4x4").
const char* path_name(ConvPath path);
const char* path_scope(ConvPath path);
const char* grad_name(DataGradSource source);   // "dgrad_lanes", ...
const char* grad_scope(DataGradSource source);
const char* grad_name(WeightGradSource source);  // "wgrad_lanes", ...
const char* grad_scope(WeightGradSource source);

inline bool is_onednn(ConvPath path) { return path <= ConvPath::kOnednnIntel; }

// What the call computes besides the convolution: the BN affine (inference), plus a residual added before the ReLU
// (the bottleneck's last convolution), or per-row statistics of the output for the training form's BatchNorm.
enum class ConvForm : uint8_t { kInference, kResidual, kTraining };

// Column tiling of the broadcast, expand and generic paths.
struct Tiling {
  bool expand;       // expand narrow groups, or broadcast
  int64_t tile_ow;   // output columns per tile
  int64_t span;      // input columns a tile reads: (tile_ow - 1) * stride_w + (KW - 1) * dil_w + 1
  int64_t n_tiles;   // ceil(OW / tile_ow)
  int64_t row_slots; // expanded input rows kept per thread: the (KH - 1) * dil_h + 1 rows one output row reads
  int64_t acc_size;  // tile_ow * C_out
  int64_t expand_size;
};

struct ConvPlan {
  ConvPath path;
  at::ScalarType dtype;
  ConvForm form;
  // The geometry the kernel runs: the call's, except that a pointwise convolution (1x1, stride 1, no padding) of the
  // inference forms presents each image as one row of H * W pixels (the same NHWC memory), so that pixel blocks are
  // not cut at image rows and each weight block serves a whole image.
  ConvGeom geom;
  bool image_rows;         // whether geom is that pointwise rewrite
  int vec_lanes;           // floats per vector of the ISA: 16 (AVX-512), 8 (AVX2), 0 (baseline)
  Tiling tiling;           // broadcast, expand, generic
  int vectors;             // broadcast, expand: vectors of output channels per microkernel block
  int64_t weight_block;    // output channels per block of the packed weight (broadcast: one block's; else C_out)
  int winograd_lanes;      // winograd: channels per transform vector (16: AVX-512 and 16+ per group or paired groups)
  bool winograd_image_major;  // winograd: work items image by image (every block's U packed first), else by block
  bool prefetch;           // winograd: software prefetches of the next tile block's input and this block's output
  int lane_group;          // lanes: channels per group
  bool stream;             // lanes: non-temporal output stores (where the output is 64-byte aligned)
};

// The plan for a validated geometry and dtype (float32, float64 or bfloat16).
ConvPlan plan_cpu_conv(const ConvGeom& g, at::ScalarType dtype, ConvForm form);
// Why the planner chose the plan's path, in words.
std::string describe(const ConvPlan& plan);
// The plan's parameters by name, for explain().
std::vector<std::pair<std::string, int64_t>> parameters(const ConvPlan& plan);

// The weight gradient kernel's work split (conv_wgrad.cpp): fixed chunks of output rows (one partial sum each,
// independent of the thread count) x blocks of output channels.
struct WgradPlan {
  int64_t rows;            // output rows (n, oh)
  int64_t rows_per_chunk;  // output rows per partial sum
  int64_t n_chunks;
  int64_t cb;              // output channels per task
  int64_t n_cblocks;
  int64_t lanes;           // floats per (column, ci) in the expanded rows: cb (expand) or 1 (broadcast)
  int64_t span;            // input columns one output row reads
  int64_t weight_size;     // taps * cpg_in * C_out
  int nv;                  // vectors per block (vector kernels); 0: generic
  bool broadcast;
  int jt;                  // > 0: the lanes kernel, with jt output channels per register tile
};

// Where the training backward takes the convolution's gradients from.
struct GradPlan {
  DataGradSource data;
  WeightGradSource weight;
  ConvGeom data_geom;  // the stride-1 data gradient as a convolution of grad_y (valid where data != kAten)
  ConvPlan data_plan;  // the forward kernel's plan for data_geom (where data != kAten)
  WgradPlan wgrad;     // the weight gradient kernel's split (where weight != kAten)
  bool aten_weight_wrong;  // ATen's weight gradient is wrong for this problem (aten_weight_grad_wrong)
};

// The gradient sources for a validated geometry and dtype; reads torch.use_deterministic_algorithms.
GradPlan plan_cpu_conv_grads(const ConvGeom& g, at::ScalarType dtype);
std::string describe(const GradPlan& plan);

// Whether the oneDNN routes are on: RESNEXT_KERNELS_CPU_ATEN_ROUTES=off keeps every convolution on the project's
// kernels (to test or time them); read once, an unknown value is an error.
bool aten_routes_enabled();

}  // namespace cpu
}  // namespace rk
