// Host side of the tensor-core kernels (kernels/conv_tc.cuh), shared by the real CUDA build and the emulated
// build: weight packing (cached for inference), launches of the inference and training forms.
#pragma once
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/flip.h>
#include <c10/util/Exception.h>

#include <array>
#include <list>
#include <mutex>
#include <tuple>

#include "cuda/kernels/bn_vec8.cuh"
#include "cuda/kernels/conv_tc.cuh"

namespace rk {
namespace tc_detail {

inline void check(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
}

inline int elem_bytes(at::ScalarType t) {
  return cuda_kernels::conv_tc_elem_bytes(t == at::kHalf || t == at::kBFloat16, t == at::kFloat,
                                          at::globalContext().allowTF32CuDNN());
}

template <typename F>
void dispatch_tc(at::ScalarType dtype, const F& f) {
  if (dtype == at::kHalf) {
    f(__half());
  } else if (dtype == at::kBFloat16) {
    f(__nv_bfloat16());
  } else {
    f(float());
  }
}

inline at::Tensor pack_weight(const char* op, const ConvGeom& g, const cuda_kernels::TcPlan& plan,
                              const at::Tensor& weight, cudaStream_t stream) {
  const int64_t vectors = (g.C_out / cuda_kernels::kTcChannels) * int64_t(plan.ksteps) * 8 * 32;
  at::Tensor packed = at::empty({vectors * 2}, weight.options().dtype(at::kInt));
  const at::Tensor w = weight.permute({0, 2, 3, 1}).contiguous();  // OHWI: a fragment's k-pair is 4 adjacent bytes
  dispatch_tc(weight.scalar_type(), [&](auto t) {
    using T = decltype(t);
    check(launch_kernel(cuda_kernels::conv_tc_pack_weight_kernel<T>, dim3(unsigned((vectors + 255) / 256)), dim3(256),
                        0, stream, reinterpret_cast<const T*>(w.const_data_ptr()), g, plan,
                        reinterpret_cast<uint2*>(packed.mutable_data_ptr())),
          op);
  });
  return packed;
}

// Packed weights of the inference form, by the weight's storage (a weak reference: a freed weight's entry never
// matches a new tensor at the same address), offset, version, dtype and shape: a model's layers are packed once,
// not per call. At most kEntries are kept, the least recently used evicted first; entries of freed weights go at
// the next lookup.
class PackedWeightCache {
 public:
  static PackedWeightCache& instance() {
    static PackedWeightCache cache;
    return cache;
  }

  at::Tensor get(const char* op, const ConvGeom& g, const cuda_kernels::TcPlan& plan, const at::Tensor& weight,
                 cudaStream_t stream) {
    const c10::StorageImpl* storage = weight.storage().unsafeGetStorageImpl();
    Key key{weight.storage_offset(), weight._version(), weight.scalar_type(), g.C_out, g.C_in, g.groups, g.KH, g.KW,
            {weight.stride(0), weight.stride(1), weight.stride(2), weight.stride(3)}};
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = entries_.begin(); it != entries_.end();) {
      if (it->storage.expired()) {
        it = entries_.erase(it);
        continue;
      }
      if (it->storage._unsafe_get_target() == storage && it->key == key) {
        entries_.splice(entries_.begin(), entries_, it);
        return it->packed;
      }
      ++it;
    }
    at::Tensor packed = pack_weight(op, g, plan, weight, stream);
    entries_.push_front(Entry{c10::weak_intrusive_ptr<c10::StorageImpl>(weight.storage().getWeakStorageImpl()), key,
                              packed});
    if (entries_.size() > kEntries) entries_.pop_back();
    return packed;
  }

 private:
  static constexpr size_t kEntries = 256;
  struct Key {
    int64_t offset, version;
    at::ScalarType dtype;
    int64_t c_out, c_in;
    int32_t groups, kh, kw;
    std::array<int64_t, 4> strides;
    bool operator==(const Key& o) const {
      return offset == o.offset && version == o.version && dtype == o.dtype && c_out == o.c_out && c_in == o.c_in &&
             groups == o.groups && kh == o.kh && kw == o.kw && strides == o.strides;
    }
  };
  struct Entry {
    c10::weak_intrusive_ptr<c10::StorageImpl> storage;
    Key key;
    at::Tensor packed;
  };
  std::mutex mutex_;
  std::list<Entry> entries_;
};

template <typename T, bool STATS>
void launch_fwd(const char* op, const ConvGeom& g, const cuda_kernels::TcPlan& plan, const at::Tensor& x,
                const at::Tensor& packed, const float* scale, const float* shift, at::Tensor& y, float2* partials,
                bool relu, cudaStream_t stream) {
  using namespace cuda_kernels;
  const int64_t cpg = g.C_in / g.groups;  // the plan's warp tiling follows from it (conv_tc_plan)
  auto kernel = cpg <= 8     ? conv_tc_fwd_kernel<T, 4, STATS, 2, 4, 4>
                : cpg == 16  ? conv_tc_fwd_kernel<T, 2, STATS, 1, 8, 4>
                : cpg == 32  ? conv_tc_fwd_kernel<T, 1, STATS, 1, 8, 4>
                             : conv_tc_fwd_kernel<T, 1, STATS, 2, 4, 8>;
  if (plan.smem_bytes > 48 * 1024) check(set_max_dynamic_smem(kernel, plan.smem_bytes), op);
  check(launch_kernel(kernel, dim3(unsigned(plan.grid_x), unsigned(plan.grid_y)), dim3(unsigned(plan.threads)),
                      plan.smem_bytes, stream, reinterpret_cast<const T*>(x.const_data_ptr()),
                      reinterpret_cast<const uint2*>(packed.const_data_ptr()), scale, shift,
                      reinterpret_cast<T*>(y.mutable_data_ptr()), partials, g, plan, relu),
        op);
}

}  // namespace tc_detail

// The tensor-core plan for this problem, or the reason there is none.
inline const char* conv_tc_unsupported_reason(const ConvGeom& g, at::ScalarType dtype, cuda_kernels::TcPlan* plan) {
  return cuda_kernels::conv_tc_plan(g, tc_detail::elem_bytes(dtype), plan);
}

// relu?(conv2d(x, w) * scale + shift), channels_last; x channels_last, scale/shift float32 (validated by the caller).
inline at::Tensor conv_tc_infer(const char* op, const ConvGeom& g, const cuda_kernels::TcPlan& plan,
                                const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                                const at::Tensor& shift, bool relu, cudaStream_t stream) {
  at::Tensor y = at::empty({g.N, g.C_out, g.OH, g.OW}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  const at::Tensor packed = tc_detail::PackedWeightCache::instance().get(op, g, plan, weight, stream);
  // The epilogue reads channel pairs as float2: 8-byte aligned vectors.
  auto aligned = [](const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 8 ? t.clone() : t;
  };
  const at::Tensor sc = aligned(scale), sh = aligned(shift);
  tc_detail::dispatch_tc(x.scalar_type(), [&](auto t) {
    tc_detail::launch_fwd<decltype(t), false>(op, g, plan, x, packed, sc.const_data_ptr<float>(),
                                              sh.const_data_ptr<float>(), y, nullptr, relu, stream);
  });
  return y;
}

// The tensor-core plan of a stride-1 convolution's data gradient (geometry in `gd`), or the reason there is none.
inline const char* conv_tc_data_grad_unsupported_reason(const ConvGeom& g, at::ScalarType dtype, ConvGeom* gd,
                                                        cuda_kernels::TcPlan* plan) {
  return cuda_kernels::conv_tc_data_grad_plan(g, tc_detail::elem_bytes(dtype), gd, plan);
}

// dx = conv(grad_y, w') on the tensor cores, w' each group's transposed, flipped kernel (channels_last), for the
// plan conv_tc_data_grad_unsupported_reason gave.
inline at::Tensor conv_tc_data_grad(const char* op, const ConvGeom& g, const ConvGeom& gd,
                                    const cuda_kernels::TcPlan& plan, const at::Tensor& grad_y,
                                    const at::Tensor& weight, cudaStream_t stream) {
  const int64_t groups = g.groups, cpg_in = g.C_in / groups, cpg_out = g.C_out / groups;
  const at::Tensor wt = weight.reshape({groups, cpg_out, cpg_in, g.KH, g.KW})
                            .transpose(1, 2)
                            .flip({3, 4})
                            .reshape({g.C_in, cpg_out, g.KH, g.KW});
  at::Tensor dx =
      at::empty({gd.N, gd.C_out, gd.OH, gd.OW}, grad_y.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (dx.numel() == 0) return dx;
  const at::Tensor packed = tc_detail::pack_weight(op, gd, plan, wt, stream);  // changes every step: no cache
  tc_detail::dispatch_tc(grad_y.scalar_type(), [&](auto t) {
    tc_detail::launch_fwd<decltype(t), false>(op, gd, plan, grad_y.contiguous(at::MemoryFormat::ChannelsLast), packed,
                                              nullptr, nullptr, dx, nullptr, false, stream);
  });
  return dx;
}

// The training form's convolution and batch statistics: (y, mean, var, a, b) with y the raw convolution
// (channels_last), mean and biased variance of y over (N, H, W), and the BN affine map out = y * a + b.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_tc_train(
    const char* op, const ConvGeom& g, const cuda_kernels::TcPlan& plan, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& gamma, const at::Tensor& beta, double eps, cudaStream_t stream) {
  using namespace cuda_kernels;
  const at::TensorOptions f32 = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty({g.N, g.C_out, g.OH, g.OW}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor mean = at::empty({g.C_out}, f32), var = at::empty({g.C_out}, f32);
  at::Tensor a = at::empty({g.C_out}, f32), b = at::empty({g.C_out}, f32);
  at::Tensor partials = at::empty({plan.grid_x * g.C_out * 2}, f32);
  const at::Tensor packed = tc_detail::pack_weight(op, g, plan, weight, stream);  // changes every step: no cache
  tc_detail::dispatch_tc(x.scalar_type(), [&](auto t) {
    tc_detail::launch_fwd<decltype(t), true>(op, g, plan, x, packed, nullptr, nullptr, y,
                                             reinterpret_cast<float2*>(partials.mutable_data_ptr<float>()), false,
                                             stream);
  });
  tc_detail::check(launch_kernel(conv_tc_stats_finalize_kernel, dim3(unsigned((g.C_out + 127) / 128)), dim3(128), 0,
                                 stream, reinterpret_cast<const float2*>(partials.const_data_ptr<float>()), g, plan,
                                 eps, gamma.defined() ? gamma.const_data_ptr<float>() : nullptr,
                                 beta.defined() ? beta.const_data_ptr<float>() : nullptr,
                                 mean.mutable_data_ptr<float>(), var.mutable_data_ptr<float>(),
                                 a.mutable_data_ptr<float>(), b.mutable_data_ptr<float>()),
                   op);
  return {y, mean, var, a, b};
}

// out = relu?(y * a + b) for a channels_last float16/bfloat16/float32 y with C % 8 == 0, 8 channels per thread.
inline at::Tensor normalize_relu_vec8(const char* op, const at::Tensor& y, const at::Tensor& a, const at::Tensor& b,
                                      bool relu, cudaStream_t stream) {
  at::Tensor out = at::empty_like(y);
  const int64_t C = y.size(1), M = y.numel() / (C > 0 ? C : 1);
  if (y.numel() == 0) return out;
  const cuda_kernels::Vec8Plan plan = cuda_kernels::vec8_plan(M, C);
  tc_detail::dispatch_tc(y.scalar_type(), [&](auto t) {
    using T = decltype(t);
    tc_detail::check(launch_kernel(cuda_kernels::normalize_relu_vec8_kernel<T>,
                                   dim3(unsigned(plan.grid_x), unsigned(plan.grid_y)), dim3(cuda_kernels::kVec8Threads),
                                   cuda_kernels::vec8_smem_bytes(plan, 2), stream,
                                   reinterpret_cast<const T*>(y.const_data_ptr()), a.const_data_ptr<float>(),
                                   b.const_data_ptr<float>(), M, C, relu, plan,
                                   reinterpret_cast<T*>(out.mutable_data_ptr())),
                     op);;
  });
  return out;
}

}  // namespace rk
