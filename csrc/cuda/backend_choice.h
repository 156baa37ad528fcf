// The run-time choice between the project's CUDA kernels and the library path (cuDNN's convolution, then ATen's
// BatchNorm and ReLU), per problem. Shared by the real CUDA ops and the emulated ones (which take injected times).
//
// The first call of each problem (device, shapes, strides, padding, dilation, groups, dtype, layout, form, TF32)
// times both once warmed up, a few runs each, interleaved, and keeps the faster for the process: a user is never
// slower than the library where our kernels lose. RESNEXT_KERNELS_CUDA_BACKEND=ours|cudnn forces one. Under
// torch.use_deterministic_algorithms(True) our kernels run without timing (they are deterministic; a timed choice
// could differ between processes). While a CUDA graph is being captured nothing is timed: a problem not seen
// before runs our kernels, uncached, so the first call outside the capture still times it.
#pragma once

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <c10/util/Exception.h>

namespace rk {

enum class CudaBackend : int { kOurs = 0, kLibrary = 1 };

struct BackendChoice {
  CudaBackend backend = CudaBackend::kOurs;
  double ours_ms = -1.0, library_ms = -1.0;  // -1: not timed
  std::string reason;
};

constexpr const char* kCudaBackendEnv = "RESNEXT_KERNELS_CUDA_BACKEND";

enum class BackendMode { kAuto, kOurs, kLibrary };

// The mode RESNEXT_KERNELS_CUDA_BACKEND asks for (read at every call: tests and users may change it).
inline BackendMode backend_mode() {
  const char* v = std::getenv(kCudaBackendEnv);
  const std::string s = v ? v : "";
  if (s.empty() || s == "auto") return BackendMode::kAuto;
  if (s == "ours") return BackendMode::kOurs;
  if (s == "cudnn") return BackendMode::kLibrary;
  TORCH_CHECK(false, kCudaBackendEnv, " must be ours, cudnn or auto (or unset), got '", s, "'");
}

class BackendChooser {
 public:
  using Key = std::vector<int64_t>;
  // Milliseconds of one run of a candidate (the caller warms up and repeats).
  using Timer = std::function<double(CudaBackend)>;

  static BackendChooser& instance() {
    static BackendChooser chooser;
    return chooser;
  }

  BackendChoice choose(const Key& key, bool can_time, bool deterministic, const Timer& time) {
    const BackendMode mode = backend_mode();
    if (mode == BackendMode::kOurs) return {CudaBackend::kOurs, -1, -1, std::string("forced by ") + kCudaBackendEnv};
    if (mode == BackendMode::kLibrary) {
      return {CudaBackend::kLibrary, -1, -1, std::string("forced by ") + kCudaBackendEnv};
    }
    if (deterministic) {
      return {CudaBackend::kOurs, -1, -1, "torch.use_deterministic_algorithms is on: the project's kernels, which are "
                                          "deterministic, without timing"};
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = choices_.find(key);
      if (it != choices_.end()) return it->second;
    }
    if (!can_time) return {CudaBackend::kOurs, -1, -1, "not timed yet (a CUDA graph is being captured)"};
    BackendChoice c;
    if (fake_) {
      c.ours_ms = fake_ours_ms_;
      c.library_ms = fake_library_ms_;
    } else {
      time(CudaBackend::kOurs);  // warm-up: caches, packed weights, cuDNN's algorithm search
      time(CudaBackend::kLibrary);
      double ours[kRuns], library[kRuns];
      for (int r = 0; r < kRuns; ++r) {  // interleaved, so a clock change affects both
        ours[r] = time(CudaBackend::kOurs);
        library[r] = time(CudaBackend::kLibrary);
      }
      c.ours_ms = median(ours);
      c.library_ms = median(library);
    }
    c.backend = c.ours_ms <= c.library_ms ? CudaBackend::kOurs : CudaBackend::kLibrary;
    c.reason = std::string("timed on the first call: the project's kernels ") + format_ms(c.ours_ms) +
               ", cuDNN + ATen BatchNorm/ReLU " + format_ms(c.library_ms) + " (median of " + std::to_string(kRuns) +
               "): the faster runs";
    std::lock_guard<std::mutex> lock(mutex_);
    ++timed_;
    return choices_.emplace(key, c).first->second;
  }

  std::optional<BackendChoice> lookup(const Key& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = choices_.find(key);
    if (it == choices_.end()) return std::nullopt;
    return it->second;
  }

  // Tests: every later timing gives these times (no kernel is run to time); clear() forgets the choices made and
  // the count of timings.
  void set_fake_times(double ours_ms, double library_ms) {
    std::lock_guard<std::mutex> lock(mutex_);
    fake_ = true;
    fake_ours_ms_ = ours_ms;
    fake_library_ms_ = library_ms;
  }
  void clear_fake_times() {
    std::lock_guard<std::mutex> lock(mutex_);
    fake_ = false;
  }
  bool fake() {
    std::lock_guard<std::mutex> lock(mutex_);
    return fake_;
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    choices_.clear();
    timed_ = 0;
  }
  int64_t timed() {
    std::lock_guard<std::mutex> lock(mutex_);
    return timed_;
  }

 private:
  static constexpr int kRuns = 5;

  static double median(double (&v)[kRuns]) {
    std::sort(v, v + kRuns);
    return v[kRuns / 2];
  }

  static std::string format_ms(double ms) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%.3f ms", ms);
    return buf;
  }

  std::mutex mutex_;
  std::map<Key, BackendChoice> choices_;
  int64_t timed_ = 0;
  bool fake_ = false;
  double fake_ours_ms_ = 0, fake_library_ms_ = 0;
};

}  // namespace rk
