// A profiler scope named after the path that runs ("resnext_kernels::winograd_f4x4"), so that torch.profiler shows
// which kernel a call took and tests can check it against explain(). While no profiler records, it costs one check.
#pragma once
#include <ATen/record_function.h>

#include <string_view>

namespace rk {

class PathScope {
 public:
  explicit PathScope(const char* name) : guard_(at::RecordScope::FUNCTION) {
    if (guard_.isActive()) guard_.before(std::string_view(name));
  }
  PathScope(const PathScope&) = delete;
  PathScope& operator=(const PathScope&) = delete;

 private:
  at::RecordFunction guard_;
};

}  // namespace rk
