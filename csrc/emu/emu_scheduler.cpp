// The CUDA-on-CPU emulator's scheduler: one fiber (ucontext) per CUDA thread, guard-paged stacks, blocks one
// at a time. Fibers run until they reach a scheduling point (__syncthreads, a warp operation) or finish;
// when no fiber can run, the scheduler resolves what every waiting thread agrees on, or reports why the
// block cannot go on. Errors are raised as KernelError on the caller's stack, never through a fiber frame.
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <vector>

#include "emu/emu_internal.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define RK_EMU_ASAN 1
#else
#define RK_EMU_ASAN 0
#endif

namespace rk {
namespace emu {
namespace {

// Fiber stack size, guard page included: 256 KiB unless the environment variable RK_EMU_STACK_KIB says
// otherwise (read once). Stacks are mapped lazily, so only the pages a kernel touches cost memory.
size_t stack_bytes() {
  static const size_t bytes = [] {
    const char* env = std::getenv("RK_EMU_STACK_KIB");
    const long kib = env ? std::strtol(env, nullptr, 10) : 256;
    const size_t page = static_cast<size_t>(getpagesize());
    return std::max(size_t(kib) * 1024, 4 * page) / page * page;
  }();
  return bytes;
}

enum class State { kReady, kBarrier, kWarp, kDone };

struct Builtins {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};

struct Fiber {
  Builtins builtins;
  internal::LaneContext lane;
  internal::CpAsyncQueue cp_async;
  State state = State::kReady;
  ucontext_t context;
  void* stack_base = nullptr;  // mapping, guard page first
  size_t stack_bytes = 0;
  // the scheduling point it waits at
  const char* file = nullptr;
  int line = 0;
  WarpOp op = WarpOp::kSync;
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int param = 0, width = 32;
  void* payload = nullptr;  // a collective's operands
};

struct Schedule {
  BlockOrder order = BlockOrder::kForward;
  uint64_t seed = 0;
};

std::mutex g_launch_mutex;  // one launch at a time, process-wide (function-local statics are shared memory)
std::mutex g_schedule_mutex;
Schedule g_schedule;
LaunchStats g_stats{};

// State of the block being run (only touched under g_launch_mutex).
struct BlockRun {
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  ucontext_t scheduler;
  const std::function<void()>* body = nullptr;
  std::unique_ptr<unsigned char[]> smem;
  std::string error;  // set by a fiber that hit a kernel error or threw
  bool counting = false;  // a counted launch (internal::counters)
  uint64_t block_barriers = 0;
#if RK_EMU_ASAN
  const void* main_stack_bottom = nullptr;
  size_t main_stack_size = 0;
  void* fake_stack = nullptr;
#endif
};
BlockRun* g_run = nullptr;

std::string where(const char* file, int line) {
  std::ostringstream s;
  s << (file ? file : "?") << ":" << line;
  return s.str();
}

void switch_to_scheduler() {
  Fiber* f = g_run->current;
#if RK_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, g_run->main_stack_bottom, g_run->main_stack_size);
  swapcontext(&f->context, &g_run->scheduler);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  swapcontext(&f->context, &g_run->scheduler);
#endif
}

void fiber_entry() {
#if RK_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_run->main_stack_bottom, &g_run->main_stack_size);
#endif
  Fiber* self = g_run->current;
  if (g_run->counting) internal::counters::set_lane(&self->lane);
  try {
    (*g_run->body)();
  } catch (const std::exception& e) {
    if (g_run->error.empty()) g_run->error = std::string("the kernel threw: ") + e.what();
  } catch (...) {
    if (g_run->error.empty()) g_run->error = "the kernel threw a non-standard exception";
  }
  internal::counters::set_lane(nullptr);
  if (const internal::PendingCopy* c = self->cp_async.any(); c && g_run->error.empty()) {
    g_run->error = "cp.async issued at " + where(c->file, c->line) +
                   " was never waited for (cp.async.wait_group / wait_all) before the thread exited";
  }
  self->state = State::kDone;
#if RK_EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, g_run->main_stack_bottom, g_run->main_stack_size);
#endif
  setcontext(&g_run->scheduler);
}

void run_fiber(Fiber& f) {
  g_run->current = &f;
#if RK_EMU_ASAN
  __sanitizer_start_switch_fiber(&g_run->fake_stack, static_cast<char*>(f.stack_base) + getpagesize(),
                                 f.stack_bytes - getpagesize());
  swapcontext(&g_run->scheduler, &f.context);
  __sanitizer_finish_switch_fiber(g_run->fake_stack, nullptr, nullptr);
#else
  swapcontext(&g_run->scheduler, &f.context);
#endif
  g_run->current = nullptr;
}

// Stacks are reused across blocks and launches; each has a PROT_NONE guard page below it.
std::vector<std::pair<void*, size_t>>& stack_pool() {
  static std::vector<std::pair<void*, size_t>> pool;
  return pool;
}

void* acquire_stack(size_t bytes) {
  auto& pool = stack_pool();
  if (!pool.empty()) {
    void* p = pool.back().first;
    pool.pop_back();
    return p;
  }
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw KernelError("CUDA emulator: cannot map a fiber stack");
  mprotect(p, static_cast<size_t>(getpagesize()), PROT_NONE);
  return p;
}

void release_stacks(std::vector<Fiber>& fibers) {
  for (Fiber& f : fibers) {
    if (!f.stack_base) continue;
#if RK_EMU_ASAN
    // A fiber abandoned after an error leaves its frames' redzones poisoned: clear them before reuse.
    __asan_unpoison_memory_region(static_cast<char*>(f.stack_base) + getpagesize(), f.stack_bytes - getpagesize());
#endif
    stack_pool().emplace_back(f.stack_base, f.stack_bytes);
    f.stack_base = nullptr;
  }
}

// Completes the warp operations whose participants have all arrived. Returns whether any completed, or
// sets `error` when a waiting warp can never complete.
bool resolve_warps(std::vector<Fiber>& fibers, std::string& error) {
  bool progress = false;
  const size_t n = fibers.size();
  for (size_t w0 = 0; w0 < n; w0 += 32) {
    const size_t w1 = std::min(n, w0 + 32);
    unsigned waiting = 0, exited = 0;
    for (size_t i = w0; i < w1; ++i) {
      const unsigned bit = 1u << (i - w0);
      if (fibers[i].state == State::kWarp) waiting |= bit;
      else if (fibers[i].state == State::kDone) exited |= bit;
    }
    if (!waiting) continue;
    // __activemask first: each call site's waiting lanes form the active set (others have diverged).
    bool active_masks = false;
    for (size_t i = w0; i < w1; ++i) {
      const Fiber& f = fibers[i];
      if (f.state != State::kWarp || f.op != WarpOp::kActiveMask) continue;
      unsigned group = 0;
      for (size_t j = w0; j < w1; ++j) {
        const Fiber& o = fibers[j];
        if (o.state == State::kWarp && o.op == WarpOp::kActiveMask && where(o.file, o.line) == where(f.file, f.line)) {
          group |= 1u << (j - w0);
        }
      }
      for (size_t j = w0; j < w1; ++j) {
        if (group & (1u << (j - w0))) {
          fibers[j].result = group;
          fibers[j].state = State::kReady;
        }
      }
      active_masks = true;
    }
    if (active_masks) {  // the other operations of this warp are resolved on a later pass
      progress = true;
      continue;
    }
    const unsigned lanes_present = (w1 - w0) == 32 ? 0xffffffffu : ((1u << (w1 - w0)) - 1);
    // Warp-collective instructions (mma.sync, ldmatrix: .sync.aligned) need every lane of the warp at the same
    // instruction: an exited lane or a lane elsewhere is an error, not a wait.
    size_t first = w1;
    for (size_t i = w0; i < w1 && first == w1; ++i) {
      if (fibers[i].state == State::kWarp && fibers[i].op == WarpOp::kCollective) first = i;
    }
    if (first != w1) {
      const Fiber& f = fibers[first];
      const std::string site = where(f.file, f.line);
      if (exited) {
        error = "warp-collective instruction at " + site + ": lane " +
                std::to_string(__builtin_ctz(exited)) + " of the warp has exited (.sync.aligned instructions need "
                "every lane of the warp)";
        return false;
      }
      if (waiting != lanes_present) continue;  // a lane is at a block barrier: reported as a deadlock
      void* payloads[32] = {};
      for (size_t j = w0; j < w1; ++j) {
        const Fiber& o = fibers[j];
        if (o.op != WarpOp::kCollective || o.value != f.value || o.param != f.param ||
            where(o.file, o.line) != site) {
          error = "warp-collective instruction at " + site + ": the warp has diverged (lane " +
                  std::to_string(j - w0) + " is at " + where(o.file, o.line) + ")";
          return false;
        }
        payloads[j - w0] = o.payload;
      }
      const std::string why =
          internal::resolve_collective(int(f.value), f.param, payloads, static_cast<int>(w1 - w0));
      if (!why.empty()) {
        error = "warp-collective instruction at " + site + ": " + why;
        return false;
      }
      for (size_t j = w0; j < w1; ++j) fibers[j].state = State::kReady;
      ++g_stats.warp_ops;
      progress = true;
      continue;
    }
    // A warp operation completes for a set of lanes that all wait with the same mask covering exactly them.
    for (size_t i = w0; i < w1; ++i) {
      Fiber& f = fibers[i];
      if (f.state != State::kWarp) continue;
      const unsigned mask = f.mask;
      const std::string site = where(f.file, f.line);
      if ((mask & ~lanes_present) != 0) {
        error = "warp operation at " + site + ": mask includes lanes that do not exist in this block";
        return false;
      }
      if (!(mask & (1u << (i - w0)))) {
        error = "warp operation at " + site + ": the calling lane is not in its own mask";
        return false;
      }
      if (mask & exited) {
        error = "warp operation at " + site + ": mask includes a lane that has exited";
        return false;
      }
      if ((mask & waiting) != mask) continue;  // some participants have not arrived yet
      for (size_t j = w0; j < w1; ++j) {
        if (!(mask & (1u << (j - w0)))) continue;
        const Fiber& o = fibers[j];
        if (o.mask != mask || o.op != f.op) {
          error = "warp operation at " + site + ": lanes disagree (mask " + std::to_string(mask) + " vs " +
                  std::to_string(o.mask) + " at " + where(o.file, o.line) + ")";
          return false;
        }
      }
      // Compute every participant's result.
      uint32_t ballot = 0;
      for (size_t j = w0; j < w1; ++j) {
        if ((mask & (1u << (j - w0))) && fibers[j].value) ballot |= 1u << (j - w0);
      }
      for (size_t j = w0; j < w1; ++j) {
        if (!(mask & (1u << (j - w0)))) continue;
        Fiber& o = fibers[j];
        const int lane = static_cast<int>(j - w0);
        const int width = o.width;
        if (width <= 0 || width > 32 || (width & (width - 1))) {
          error = "warp operation at " + where(o.file, o.line) + ": width must be a power of 2 <= 32";
          return false;
        }
        const int seg = lane & ~(width - 1);
        int src = lane;
        switch (o.op) {
          case WarpOp::kShfl: src = seg + (o.param & (width - 1)); break;
          case WarpOp::kShflUp: src = (lane - o.param >= seg) ? lane - o.param : lane; break;
          case WarpOp::kShflDown: src = (lane + o.param < seg + width) ? lane + o.param : lane; break;
          case WarpOp::kShflXor: src = ((lane ^ o.param) < seg + width && (lane ^ o.param) >= seg) ? (lane ^ o.param) : lane; break;
          default: break;
        }
        switch (o.op) {
          case WarpOp::kShfl:
          case WarpOp::kShflUp:
          case WarpOp::kShflDown:
          case WarpOp::kShflXor:
            if (!(mask & (1u << src))) {
              error = "warp shuffle at " + where(o.file, o.line) + ": lane " + std::to_string(lane) +
                      " reads lane " + std::to_string(src) + ", which is outside the mask";
              return false;
            }
            o.result = fibers[w0 + src].value;
            break;
          case WarpOp::kBallot: o.result = ballot; break;
          case WarpOp::kAny: o.result = ballot != 0; break;
          case WarpOp::kAll: o.result = ballot == (mask & lanes_present); break;
          case WarpOp::kSync:
          case WarpOp::kActiveMask: o.result = 0; break;
        }
      }
      for (size_t j = w0; j < w1; ++j) {
        if (mask & (1u << (j - w0))) fibers[j].state = State::kReady;
      }
      waiting &= ~mask;
      progress = true;
      ++g_stats.warp_ops;
      if (g_run->counting) internal::counters::count_warp_op();
    }
  }
  return progress;
}

// Releases the block barrier when every live thread waits at the same __syncthreads.
bool resolve_barrier(std::vector<Fiber>& fibers, std::string& error) {
  const Fiber* first = nullptr;
  bool any_done = false;
  for (const Fiber& f : fibers) {
    if (f.state == State::kDone) {
      any_done = true;
    } else if (f.state == State::kBarrier) {
      if (!first) first = &f;
    } else {
      return false;  // someone is still running or waits at a warp op
    }
  }
  if (!first) return false;
  for (const Fiber& f : fibers) {
    if (f.state == State::kBarrier && (f.file != first->file || f.line != first->line) &&
        where(f.file, f.line) != where(first->file, first->line)) {
      error = "divergent __syncthreads: threads wait at " + where(first->file, first->line) + " and at " +
              where(f.file, f.line);
      return false;
    }
  }
  if (any_done) {
    error = "divergent __syncthreads at " + where(first->file, first->line) +
            ": some threads of the block have exited and will never reach it";
    return false;
  }
  for (Fiber& f : fibers) f.state = State::kReady;
  ++g_stats.barriers;
  ++g_run->block_barriers;
  if (g_run->counting) internal::counters::epoch_end();
  return true;
}

std::string describe_deadlock(const std::vector<Fiber>& fibers) {
  for (const Fiber& f : fibers) {
    if (f.state == State::kWarp) {
      return "deadlock: a warp operation at " + where(f.file, f.line) +
             " waits for lanes that are at a block barrier or elsewhere";
    }
  }
  return "deadlock: threads wait at a scheduling point that can never complete";
}

void run_block(BlockRun& run, const dim3& grid, const dim3& block, const uint3& block_idx, size_t smem_bytes,
               std::mt19937_64* rng) {
  const size_t nthreads = size_t(block.x) * block.y * block.z;
  run.fibers.assign(nthreads, Fiber{});
  run.smem.reset(smem_bytes ? new unsigned char[smem_bytes] : nullptr);
  if (smem_bytes) std::memset(run.smem.get(), 0xFF, smem_bytes);  // NaN bytes: a missing barrier shows
  for (size_t t = 0; t < nthreads; ++t) {
    Fiber& f = run.fibers[t];
    f.builtins.thread_idx = make_uint3(unsigned(t % block.x), unsigned((t / block.x) % block.y),
                                       unsigned(t / (size_t(block.x) * block.y)));
    f.builtins.block_idx = block_idx;
    f.builtins.block_dim = block;
    f.builtins.grid_dim = grid;
    f.stack_bytes = stack_bytes();
    f.stack_base = acquire_stack(f.stack_bytes);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = static_cast<char*>(f.stack_base) + getpagesize();
    f.context.uc_stack.ss_size = f.stack_bytes - getpagesize();
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_entry, 0);
    f.lane.warp = static_cast<uint32_t>(t / internal::kWarpSize);
    f.lane.lane = static_cast<uint32_t>(t % internal::kWarpSize);
    f.lane.stack_lo = reinterpret_cast<uintptr_t>(f.stack_base);
    f.lane.stack_hi = f.lane.stack_lo + f.stack_bytes;
  }
  internal::counters::set_shared_window(run.smem.get(), smem_bytes);
  if (run.counting) {
    std::vector<internal::LaneContext> lanes;
    lanes.reserve(nthreads);
    for (const Fiber& f : run.fibers) lanes.push_back(f.lane);
    internal::counters::begin_block(run.smem.get(), smem_bytes, lanes);
  }
  std::vector<size_t> ready;
  for (;;) {
    ready.clear();
    for (size_t t = 0; t < nthreads; ++t) {
      if (run.fibers[t].state == State::kReady) ready.push_back(t);
    }
    if (!ready.empty()) {
      // Run every ready fiber once, in a seeded order (forward schedules keep thread order).
      if (rng) std::shuffle(ready.begin(), ready.end(), *rng);
      for (size_t t : ready) {
        run_fiber(run.fibers[t]);
        if (!run.error.empty()) return;
      }
      continue;
    }
    bool all_done = std::all_of(run.fibers.begin(), run.fibers.end(),
                                [](const Fiber& f) { return f.state == State::kDone; });
    if (all_done) return;
    std::string error;
    if (resolve_warps(run.fibers, error)) continue;
    if (error.empty() && resolve_barrier(run.fibers, error)) continue;
    run.error = error.empty() ? describe_deadlock(run.fibers) : error;
    return;
  }
}

}  // namespace

void set_schedule(BlockOrder order, uint64_t seed) {
  std::lock_guard<std::mutex> lock(g_schedule_mutex);
  g_schedule = Schedule{order, seed};
}

BlockOrder schedule_order() {
  std::lock_guard<std::mutex> lock(g_schedule_mutex);
  return g_schedule.order;
}

uint64_t schedule_seed() {
  std::lock_guard<std::mutex> lock(g_schedule_mutex);
  return g_schedule.seed;
}

LaunchStats launch_stats() {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  return g_stats;
}

namespace {
const Builtins& builtins() {
  if (!g_run || !g_run->current) throw KernelError("CUDA built-in used outside an emulated kernel");
  return g_run->current->builtins;
}
}  // namespace

uint3 thread_idx() { return builtins().thread_idx; }
uint3 block_idx() { return builtins().block_idx; }
dim3 block_dim() { return builtins().block_dim; }
dim3 grid_dim() { return builtins().grid_dim; }

namespace internal {
CpAsyncQueue& current_cp_async_queue() {
  if (!g_run || !g_run->current) throw KernelError("cp.async used outside an emulated kernel");
  return g_run->current->cp_async;
}
const LaneContext& current_lane() {
  if (!g_run || !g_run->current) throw KernelError("a warp instruction used outside an emulated kernel");
  return g_run->current->lane;
}
}  // namespace internal

void* dynamic_smem() {
  if (!g_run || !g_run->current) throw KernelError("dynamic shared memory used outside an emulated kernel");
  return g_run->smem.get();
}

void syncthreads(const char* file, int line) {
  internal::RuntimeScope runtime;
  Fiber* f = g_run ? g_run->current : nullptr;
  if (!f) throw KernelError("__syncthreads outside an emulated kernel");
  f->state = State::kBarrier;
  f->file = file;
  f->line = line;
  switch_to_scheduler();
}

uint64_t warp_exchange(WarpOp op, unsigned mask, uint64_t value, int param, int width, const char* file, int line,
                       void* payload) {
  internal::RuntimeScope runtime;
  Fiber* f = g_run ? g_run->current : nullptr;
  if (!f) throw KernelError("warp function outside an emulated kernel");
  f->state = State::kWarp;
  f->payload = payload;
  f->op = op;
  f->mask = mask;
  f->value = value;
  f->param = param;
  f->width = width;
  f->file = file;
  f->line = line;
  switch_to_scheduler();
  return f->result;
}

namespace {
constexpr size_t kDefaultDynamicSmem = 48 * 1024, kMaxDynamicSmem = 227 * 1024;
std::mutex g_smem_limit_mutex;
std::map<const void*, size_t> g_smem_limits;  // kernels whose dynamic shared-memory limit was raised
}  // namespace

void raise_dynamic_smem_limit(const void* kernel, size_t bytes) {
  if (bytes > kMaxDynamicSmem) {
    throw KernelError("CUDA emulator: cudaFuncAttributeMaxDynamicSharedMemorySize " + std::to_string(bytes) +
                      " is above the 227 KiB a block can have");
  }
  std::lock_guard<std::mutex> lock(g_smem_limit_mutex);
  g_smem_limits[kernel] = bytes;
}

void run_grid(const std::function<void()>& body, dim3 grid, dim3 block, size_t dynamic_smem_bytes,
              const void* kernel, const void* params, size_t param_bytes) {
  const size_t nthreads = size_t(block.x) * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024) {
    throw KernelError("CUDA emulator: invalid block size " + std::to_string(nthreads) + " (1..1024 threads)");
  }
  if (dynamic_smem_bytes > kDefaultDynamicSmem) {
    std::lock_guard<std::mutex> lock(g_smem_limit_mutex);
    const auto it = g_smem_limits.find(kernel);
    const size_t limit = it == g_smem_limits.end() ? kDefaultDynamicSmem : it->second;
    if (kernel && dynamic_smem_bytes > limit) {
      throw KernelError("CUDA emulator: launch with " + std::to_string(dynamic_smem_bytes) +
                        " bytes of dynamic shared memory above the kernel's limit of " + std::to_string(limit) +
                        " (raise it with cudaFuncSetAttribute first)");
    }
  }
  if (size_t(grid.x) * grid.y * grid.z == 0) return;
  if (grid.y > 65535 || grid.z > 65535) throw KernelError("CUDA emulator: grid.y and grid.z must be <= 65535");
  const Schedule schedule = [] {
    std::lock_guard<std::mutex> lock(g_schedule_mutex);
    return g_schedule;
  }();
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  const size_t nblocks = size_t(grid.x) * grid.y * grid.z;
  std::vector<size_t> order(nblocks);
  for (size_t b = 0; b < nblocks; ++b) order[b] = b;
  std::mt19937_64 rng(schedule.seed);
  if (schedule.order == BlockOrder::kReverse) std::reverse(order.begin(), order.end());
  if (schedule.order == BlockOrder::kRandom) std::shuffle(order.begin(), order.end(), rng);
  std::mt19937_64* thread_rng = schedule.order == BlockOrder::kForward ? nullptr : &rng;
  internal::counters::launch_starting();
  BlockRun run;
  run.body = &body;
  run.counting = internal::counters::active();
  if (run.counting) internal::counters::begin_launch(kernel, grid, block, dynamic_smem_bytes, params, param_bytes);
  g_run = &run;
  ++g_stats.launches;
  std::string error;
  for (size_t b : order) {
    const uint3 idx = make_uint3(unsigned(b % grid.x), unsigned((b / grid.x) % grid.y),
                                 unsigned(b / (size_t(grid.x) * grid.y)));
    run.block_barriers = 0;
    run_block(run, grid, block, idx, dynamic_smem_bytes, thread_rng);
    if (run.counting && run.error.empty()) {
      internal::counters::epoch_end();
      internal::counters::end_block(run.block_barriers);
    }
    release_stacks(run.fibers);
    ++g_stats.blocks;
    g_stats.threads += nthreads;
    if (!run.error.empty()) {
      std::ostringstream s;
      s << "CUDA emulator: block (" << idx.x << "," << idx.y << "," << idx.z << "): " << run.error;
      error = s.str();
      break;
    }
  }
  g_run = nullptr;
  internal::counters::set_lane(nullptr);
  internal::counters::set_shared_window(nullptr, 0);
  if (run.counting) internal::counters::end_launch(!error.empty());
  if (!error.empty()) throw KernelError(error);
}

}  // namespace emu
}  // namespace rk
