// Internal interfaces between the emulator's parts: the scheduler (emu_scheduler.cpp), the warp-collective and
// asynchronous-copy instructions (emu_ptx.cpp) and the counters (emu_counters.cpp). None of these files is
// instrumented: only kernel code calls the counters' memory hooks.
#pragma once

#include <cstdint>
#include <deque>
#include <string>
#include <vector>

#include "emu/emu_runtime.h"

namespace rk {
namespace emu {
namespace internal {

constexpr int kWarpSize = 32;

// What the counters know of the running CUDA thread.
struct LaneContext {
  uint32_t warp = 0;  // warp index within the block
  uint32_t lane = 0;
  uintptr_t stack_lo = 0, stack_hi = 0;  // its fiber stack: local memory
};

// One cp.async of one thread: the source bytes are read when it is issued, and land in shared memory (with the
// zero-fill) only at the cp.async.wait_group that covers its group.
struct PendingCopy {
  unsigned char* dst = nullptr;
  unsigned char bytes[16] = {};
  int cp_size = 0, src_size = 0;
  const char* file = nullptr;
  int line = 0;
};

struct CpAsyncQueue {
  std::vector<PendingCopy> uncommitted;
  std::deque<std::vector<PendingCopy>> groups;  // committed, oldest first
  bool empty() const { return uncommitted.empty() && groups.empty(); }
  const PendingCopy* any() const {
    if (!uncommitted.empty()) return &uncommitted.front();
    for (const auto& g : groups)
      if (!g.empty()) return &g.front();
    return nullptr;
  }
};

// The running thread's queue (scheduler); KernelError outside a kernel.
CpAsyncQueue& current_cp_async_queue();
const LaneContext& current_lane();

// Completes a warp-collective instruction for the lanes of one warp (emu_ptx.cpp). payloads[l] is lane l's
// operand block, nlanes the warp's lanes. Returns an error message, or "" on success.
std::string resolve_collective(int kind, int variant, void* const* payloads, int nlanes);

namespace counters {

enum class Space { kGlobal, kShared, kLocal, kParam };

// While a counted launch runs, the hooks record for the lane set here (nullptr: record nothing). The scheduler
// sets it when a fiber enters kernel code and clears it whenever runtime code runs.
void set_lane(const LaneContext* lane);
const LaneContext* lane();

bool active();  // profile_start() was called and not yet stopped
// Always called, counted or not: the static shared-memory ranges (before each launch) and the running block's
// dynamic shared memory, which classify() needs for the instructions' checks.
void launch_starting();
void set_shared_window(const void* smem, size_t bytes);
void begin_launch(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes, const void* params,
                  size_t param_bytes);
void begin_block(const void* smem, size_t smem_bytes, const std::vector<LaneContext>& lanes);
void epoch_end();  // a block-wide barrier or the block's end: the warp instructions so far are complete
void end_block(uint64_t barriers);
void end_launch(bool failed);

// Where an address lies, for the instructions' own checks (valid during a launch).
Space classify(uintptr_t addr, const LaneContext* lane);

// Instructions that the emulator executes itself (no hooks): counted here.
void count_mma(int kind);
// One ldmatrix of `matrices` 8x8 matrices; rows[m * 8 + r] is the address of row r of matrix m.
void count_ldmatrix(int matrices, const uintptr_t* rows);
// One lane's cp.async: grouped into warp instructions like the hooks' accesses.
void record_cp_async(const LaneContext& lane, const void* site, uintptr_t dst, int cp_size, uintptr_t src,
                     int src_size);
void count_warp_op();

}  // namespace counters

// Runtime code called from kernel code (a fiber) runs inside one of these: the hooks record nothing in it.
class RuntimeScope {
 public:
  RuntimeScope() : saved_(counters::lane()) { counters::set_lane(nullptr); }
  ~RuntimeScope() { counters::set_lane(saved_); }
  RuntimeScope(const RuntimeScope&) = delete;
  RuntimeScope& operator=(const RuntimeScope&) = delete;

 private:
  const LaneContext* saved_;
};

}  // namespace internal
}  // namespace emu
}  // namespace rk
