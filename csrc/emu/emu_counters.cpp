// The emulator's counters: what Nsight Compute would report for an emulated launch, counted exactly.
//
// Memory accesses. The kernels' translation unit is compiled with -fsanitize=thread but linked without the
// ThreadSanitizer runtime: g++ then calls __tsan_readN / __tsan_writeN before every load and store the
// optimized code makes, and this file defines those hooks. While a counted launch runs kernel code, a hook
// classifies the address (the running fiber's stack is local memory; the launching thread's stack holds the
// kernel's argument copy; the block's dynamic shared memory and the loaded objects' writable segments, where
// static __shared__ arrays live, are shared memory; everything else is global memory) and records it with its
// call site (the hook's return address), warp and lane.
//
// Warp instructions. A warp instruction is the k-th execution of one call site by the lanes of one warp: at
// each block-wide barrier and at the block's end, the records are grouped by (warp, call site, k), which is
// exact when the lanes of a warp execute a site in the same order (they reconverge as on a GPU). Sites where
// the lanes of a warp executed different counts are reported as diverged: their grouping is a model.
//
// Per warp instruction: global requests, bytes and distinct 32-byte sectors; every sector read or written over
// the launch (its unique sectors, the compulsory DRAM traffic); shared-memory wavefronts with 32 banks of 4
// bytes, accesses to one word merged (broadcast), 64-bit accesses in two phases of 16 lanes and 128-bit ones in
// four of 8 lanes, as the hardware splits them. mma.sync, ldmatrix and cp.async are counted where the emulator
// executes them (emu_ptx.cpp).
#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

#include "emu/emu_internal.h"

namespace rk {
namespace emu {
namespace internal {
namespace counters {
namespace {

enum Kind : uint8_t { kGlobalLoad, kGlobalStore, kSharedLoad, kSharedStore, kCpAsyncGlobal, kCpAsyncShared };

struct Access {
  uintptr_t site;
  uintptr_t addr;
  uint32_t warp;
  uint8_t lane;
  uint8_t kind;
  uint16_t size;
};

struct SharedCounts {
  uint64_t requests = 0, wavefronts = 0, ideal = 0;
};

struct Totals {
  uint64_t blocks = 0, threads = 0, barriers = 0, warp_ops = 0;
  // bytes: what the lanes asked for; distinct: the distinct bytes among them (lanes reading one address count
  // once), which is what sector efficiency compares with the sectors' 32 bytes
  uint64_t gld_requests = 0, gld_bytes = 0, gld_distinct_bytes = 0, gld_sectors = 0;
  uint64_t gst_requests = 0, gst_bytes = 0, gst_distinct_bytes = 0, gst_sectors = 0;
  std::map<int, uint64_t> gld_by_width, gst_by_width;  // requests by bytes per lane
  SharedCounts smem_ld, smem_st, ldmatrix, cp_async_smem;
  uint64_t ldmatrix_bytes = 0;
  uint64_t cp_async_requests = 0, cp_async_bytes = 0, cp_async_src_bytes = 0, cp_async_src_distinct_bytes = 0,
           cp_async_sectors = 0;
  uint64_t mma[3] = {0, 0, 0};  // by Collective kind: f16, bf16, tf32
  uint64_t local_ld_bytes = 0, local_st_bytes = 0;
  uint64_t requests = 0, diverged_requests = 0;
};

struct Launch {
  const void* kernel = nullptr;
  dim3 grid, block;
  size_t smem_bytes = 0;
  Totals t;
  std::unordered_set<uint64_t> read_sectors, written_sectors;
};

// Hot state, read by every hook: only the launching thread sets it, only while a fiber runs kernel code.
const LaneContext* volatile g_lane = nullptr;
pthread_t g_owner;
bool g_instrumented = false;  // set by __tsan_init: some translation unit was compiled with the hooks

std::mutex g_mutex;  // profile_start / profile_stop against launches
bool g_active = false;
std::vector<std::string> g_records;
Launch* g_launch = nullptr;
std::vector<Access> g_buf;

uintptr_t g_smem_lo = 0, g_smem_hi = 0;      // the running block's dynamic shared memory
uintptr_t g_param_lo = 0, g_param_hi = 0;    // the launching thread's stack (the kernel arguments' copy)
std::vector<std::pair<uintptr_t, uintptr_t>> g_static;  // writable segments of the loaded objects
unsigned long long g_static_adds = ~0ull, g_static_subs = ~0ull;

int collect_segment(struct dl_phdr_info* info, size_t, void* data) {
  auto* out = static_cast<std::vector<std::pair<uintptr_t, uintptr_t>>*>(data);
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    if (ph.p_type == PT_LOAD && (ph.p_flags & PF_W)) {
      const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
      out->emplace_back(lo, lo + ph.p_memsz);
    }
  }
  return 0;
}

int read_counts(struct dl_phdr_info* info, size_t, void* data) {
  auto* c = static_cast<std::pair<unsigned long long, unsigned long long>*>(data);
  *c = {info->dlpi_adds, info->dlpi_subs};
  return 1;  // every entry carries the same counts: the first is enough
}

// The writable segments change only when objects are loaded or unloaded.
void refresh_static_ranges() {
  std::pair<unsigned long long, unsigned long long> counts{0, 0};
  dl_iterate_phdr(read_counts, &counts);
  if (counts.first == g_static_adds && counts.second == g_static_subs) return;
  g_static.clear();
  dl_iterate_phdr(collect_segment, &g_static);
  std::sort(g_static.begin(), g_static.end());
  g_static_adds = counts.first;
  g_static_subs = counts.second;
}

bool in_static(uintptr_t a) {
  auto it = std::upper_bound(g_static.begin(), g_static.end(), std::make_pair(a, ~uintptr_t(0)));
  return it != g_static.begin() && a < std::prev(it)->second;
}

void host_stack_of_this_thread(uintptr_t* lo, uintptr_t* hi) {
  static thread_local uintptr_t cached_lo = 0, cached_hi = 0;
  if (!cached_hi) {
    pthread_attr_t attr;
    void* addr = nullptr;
    size_t size = 0;
    if (pthread_getattr_np(pthread_self(), &attr) == 0) {
      pthread_attr_getstack(&attr, &addr, &size);
      pthread_attr_destroy(&attr);
    }
    cached_lo = reinterpret_cast<uintptr_t>(addr);
    cached_hi = cached_lo + size;
  }
  *lo = cached_lo;
  *hi = cached_hi;
}

Space space_of(uintptr_t a, const LaneContext* lane) {
  if (lane && a >= lane->stack_lo && a < lane->stack_hi) return Space::kLocal;
  if (a >= g_smem_lo && a < g_smem_hi) return Space::kShared;
  if (a >= g_param_lo && a < g_param_hi) return Space::kParam;
  if (in_static(a)) return Space::kShared;
  return Space::kGlobal;
}

void on_access(uintptr_t addr, unsigned size, bool write, const void* site) {
  const LaneContext* lane = g_lane;
  if (!lane || !pthread_equal(pthread_self(), g_owner) || !g_launch) return;
  switch (space_of(addr, lane)) {
    case Space::kLocal:
      (write ? g_launch->t.local_st_bytes : g_launch->t.local_ld_bytes) += size;
      return;
    case Space::kParam: return;
    case Space::kShared:
      g_buf.push_back({reinterpret_cast<uintptr_t>(site), addr, lane->warp, uint8_t(lane->lane),
                       uint8_t(write ? kSharedStore : kSharedLoad), uint16_t(std::min(size, 65535u))});
      return;
    case Space::kGlobal:
      g_buf.push_back({reinterpret_cast<uintptr_t>(site), addr, lane->warp, uint8_t(lane->lane),
                       uint8_t(write ? kGlobalStore : kGlobalLoad), uint16_t(std::min(size, 65535u))});
      return;
  }
}

// Distinct 32-byte sectors of a warp instruction's accesses (added to the launch's unique set), and its distinct
// bytes.
uint64_t sectors(const Access* const* recs, size_t n, std::unordered_set<uint64_t>& unique, uint64_t* distinct) {
  std::vector<uint64_t> s;
  std::vector<std::pair<uint64_t, uint64_t>> spans;
  s.reserve(n * 2);
  spans.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    if (recs[i]->size == 0) continue;
    for (uint64_t x = recs[i]->addr >> 5; x <= (recs[i]->addr + recs[i]->size - 1) >> 5; ++x) s.push_back(x);
    spans.emplace_back(recs[i]->addr, recs[i]->addr + recs[i]->size);
  }
  std::sort(s.begin(), s.end());
  s.erase(std::unique(s.begin(), s.end()), s.end());
  unique.insert(s.begin(), s.end());
  std::sort(spans.begin(), spans.end());
  uint64_t covered = 0, end = 0;
  for (const auto& [lo, hi] : spans) {
    if (hi <= end) continue;
    covered += hi - std::max(lo, end);
    end = hi;
  }
  *distinct += covered;
  return s.size();
}

// Shared-memory wavefronts of one warp instruction: per phase (all 32 lanes for accesses of up to 4 bytes, 16
// lanes for 8, 8 lanes for 16), the most distinct 4-byte words any bank must deliver.
void wavefronts(const Access* const* recs, size_t n, SharedCounts& c) {
  unsigned width = 0;
  for (size_t i = 0; i < n; ++i) width = std::max<unsigned>(width, recs[i]->size);
  const unsigned phase_lanes = width <= 4 ? 32 : width <= 8 ? 16 : 8;
  std::vector<uint64_t> words[32];
  for (size_t i = 0; i < n; ++i) {
    auto& w = words[recs[i]->lane / phase_lanes];
    for (uint64_t x = recs[i]->addr >> 2; x <= (recs[i]->addr + recs[i]->size - 1) >> 2; ++x) w.push_back(x);
  }
  ++c.requests;
  for (auto& w : words) {
    if (w.empty()) continue;
    std::sort(w.begin(), w.end());
    w.erase(std::unique(w.begin(), w.end()), w.end());
    unsigned per_bank[32] = {};
    unsigned most = 0;
    for (uint64_t x : w) most = std::max(most, ++per_bank[x & 31]);
    c.wavefronts += most;
    c.ideal += 1;
  }
}

// RK_EMU_COUNTERS_TRACE=1 prints every warp instruction to stderr (kind, call site, lanes, bytes).
bool trace() {
  static const bool on = [] {
    const char* v = std::getenv("RK_EMU_COUNTERS_TRACE");
    return v && *v && *v != '0';
  }();
  return on;
}

void count_group(Kind kind, const Access* const* recs, size_t n, bool diverged) {
  Totals& t = g_launch->t;
  if (trace()) {
    std::fprintf(stderr, "[rk emu] kind %d site %p lanes %zu width %u first %p%s\n", int(kind),
                 reinterpret_cast<void*>(recs[0]->site), n, unsigned(recs[0]->size),
                 reinterpret_cast<void*>(recs[0]->addr), diverged ? " diverged" : "");
  }
  ++t.requests;
  if (diverged) ++t.diverged_requests;
  uint64_t bytes = 0;
  unsigned width = 0;
  for (size_t i = 0; i < n; ++i) {
    bytes += recs[i]->size;
    width = std::max<unsigned>(width, recs[i]->size);
  }
  switch (kind) {
    case kGlobalLoad:
      ++t.gld_requests;
      ++t.gld_by_width[int(width)];
      t.gld_bytes += bytes;
      t.gld_sectors += sectors(recs, n, g_launch->read_sectors, &t.gld_distinct_bytes);
      break;
    case kGlobalStore:
      ++t.gst_requests;
      ++t.gst_by_width[int(width)];
      t.gst_bytes += bytes;
      t.gst_sectors += sectors(recs, n, g_launch->written_sectors, &t.gst_distinct_bytes);
      break;
    case kCpAsyncGlobal:
      ++t.cp_async_requests;
      t.cp_async_src_bytes += bytes;
      t.cp_async_sectors += sectors(recs, n, g_launch->read_sectors, &t.cp_async_src_distinct_bytes);
      break;
    case kSharedLoad: wavefronts(recs, n, t.smem_ld); break;
    case kSharedStore: wavefronts(recs, n, t.smem_st); break;
    case kCpAsyncShared:
      --t.requests;  // the same instruction as its kCpAsyncGlobal half
      t.cp_async_bytes += bytes;
      wavefronts(recs, n, t.cp_async_smem);
      break;
  }
}

// Groups the records since the last barrier into warp instructions and counts them.
void flush() {
  if (g_buf.empty() || !g_launch) {
    g_buf.clear();
    return;
  }
  std::stable_sort(g_buf.begin(), g_buf.end(), [](const Access& a, const Access& b) {
    if (a.warp != b.warp) return a.warp < b.warp;
    if (a.site != b.site) return a.site < b.site;
    return a.kind < b.kind;
  });
  std::vector<uint32_t> k_of;
  std::vector<const Access*> order;
  for (size_t b = 0; b < g_buf.size();) {
    size_t e = b;
    while (e < g_buf.size() && g_buf[e].warp == g_buf[b].warp && g_buf[e].site == g_buf[b].site &&
           g_buf[e].kind == g_buf[b].kind) {
      ++e;
    }
    // The k-th execution of the site by each lane (records are in each lane's program order).
    uint32_t count[32] = {};
    k_of.resize(e - b);
    for (size_t i = b; i < e; ++i) k_of[i - b] = count[g_buf[i].lane]++;
    uint32_t lo = ~0u, hi = 0;
    for (uint32_t c : count) {
      if (c) {
        lo = std::min(lo, c);
        hi = std::max(hi, c);
      }
    }
    const bool diverged = lo != hi;
    // Counting sort by k.
    std::vector<size_t> start(hi + 1, 0);
    for (uint32_t k : k_of) ++start[k + 1];
    for (uint32_t k = 0; k < hi; ++k) start[k + 1] += start[k];
    order.assign(e - b, nullptr);
    std::vector<size_t> fill(start.begin(), start.end() - 1);
    for (size_t i = b; i < e; ++i) order[fill[k_of[i - b]]++] = &g_buf[i];
    for (uint32_t k = 0; k < hi; ++k) {
      count_group(Kind(g_buf[b].kind), order.data() + start[k], start[k + 1] - start[k], diverged);
    }
    b = e;
  }
  g_buf.clear();
}

// ---- kernel names: the launch's function pointer looked up in its object's symbol table ----------------

std::mutex g_names_mutex;
std::unordered_map<std::string, std::map<uintptr_t, std::string>> g_symtabs;  // file -> (value -> name)

const std::map<uintptr_t, std::string>& symtab_of(const std::string& file) {
  auto found = g_symtabs.find(file);
  if (found != g_symtabs.end()) return found->second;
  std::map<uintptr_t, std::string>& table = g_symtabs[file];
  const int fd = open(file.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return table;
  struct stat st;
  if (fstat(fd, &st) != 0 || st.st_size < static_cast<off_t>(sizeof(ElfW(Ehdr)))) {
    close(fd);
    return table;
  }
  void* map = mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_PRIVATE, fd, 0);
  close(fd);
  if (map == MAP_FAILED) return table;
  const auto* base = static_cast<const unsigned char*>(map);
  const auto* eh = reinterpret_cast<const ElfW(Ehdr)*>(base);
  const size_t size = static_cast<size_t>(st.st_size);
  const bool elf = std::memcmp(eh->e_ident, ELFMAG, SELFMAG) == 0;
  if (elf && eh->e_shoff + size_t(eh->e_shnum) * sizeof(ElfW(Shdr)) <= size) {
    const auto* sh = reinterpret_cast<const ElfW(Shdr)*>(base + eh->e_shoff);
    for (int i = 0; i < eh->e_shnum; ++i) {
      if (sh[i].sh_type != SHT_SYMTAB || sh[i].sh_link >= eh->e_shnum) continue;
      const ElfW(Shdr)& strs = sh[sh[i].sh_link];
      if (sh[i].sh_offset + sh[i].sh_size > size || strs.sh_offset + strs.sh_size > size) continue;
      const auto* syms = reinterpret_cast<const ElfW(Sym)*>(base + sh[i].sh_offset);
      for (size_t j = 0; j < sh[i].sh_size / sizeof(ElfW(Sym)); ++j) {
        if (ELF64_ST_TYPE(syms[j].st_info) != STT_FUNC || syms[j].st_name >= strs.sh_size) continue;
        table.emplace(syms[j].st_value, reinterpret_cast<const char*>(base + strs.sh_offset + syms[j].st_name));
      }
    }
  }
  munmap(map, size);
  return table;
}

std::string symbol_of(const void* fn) {
  if (!fn) return "";
  Dl_info info;
  if (!dladdr(fn, &info)) return "";
  if (info.dli_sname && info.dli_saddr == fn) return info.dli_sname;
  std::lock_guard<std::mutex> lock(g_names_mutex);
  const auto& table = symtab_of(info.dli_fname ? info.dli_fname : "");
  const uintptr_t a = reinterpret_cast<uintptr_t>(fn), rel = a - reinterpret_cast<uintptr_t>(info.dli_fbase);
  for (uintptr_t v : {rel, a}) {
    auto it = table.find(v);
    if (it != table.end()) return it->second;
  }
  return "";
}

// "rk::cuda_kernels::k<float, float>" from "void rk::cuda_kernels::k<float, float>(float const*, ...)".
std::string short_name(const std::string& mangled) {
  int status = 0;
  char* d = abi::__cxa_demangle(mangled.c_str(), nullptr, nullptr, &status);
  std::string s = (status == 0 && d) ? d : mangled;
  std::free(d);
  int depth = 0;
  size_t name_begin = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (c == '<') ++depth;
    else if (c == '>') --depth;
    else if (c == ' ' && depth == 0) name_begin = i + 1;  // after the return type
    else if (c == '(' && depth == 0) return s.substr(name_begin, i - name_begin);
  }
  return s.substr(name_begin);
}

std::string json_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out;
}

void put(std::ostringstream& o, const char* key, uint64_t v) { o << ",\"" << key << "\":" << v; }

void put_shared(std::ostringstream& o, const char* prefix, const SharedCounts& c) {
  const std::string p(prefix);
  put(o, (p + "_requests").c_str(), c.requests);
  put(o, (p + "_wavefronts").c_str(), c.wavefronts);
  put(o, (p + "_ideal_wavefronts").c_str(), c.ideal);
}

std::string to_json(const Launch& L) {
  const Totals& t = L.t;
  const std::string symbol = symbol_of(L.kernel);
  std::ostringstream o;
  o << "{\"kernel\":\"" << json_escape(symbol.empty() ? "?" : short_name(symbol)) << "\",\"symbol\":\""
    << json_escape(symbol) << "\",\"grid\":[" << L.grid.x << "," << L.grid.y << "," << L.grid.z << "],\"block\":["
    << L.block.x << "," << L.block.y << "," << L.block.z << "]";
  put(o, "smem_bytes", L.smem_bytes);
  put(o, "blocks", t.blocks);
  put(o, "threads", t.threads);
  put(o, "barriers", t.barriers);
  put(o, "warp_ops", t.warp_ops);
  put(o, "gld_requests", t.gld_requests);
  put(o, "gld_bytes", t.gld_bytes);
  put(o, "gld_distinct_bytes", t.gld_distinct_bytes);
  put(o, "gld_sectors", t.gld_sectors);
  put(o, "gst_requests", t.gst_requests);
  put(o, "gst_bytes", t.gst_bytes);
  put(o, "gst_distinct_bytes", t.gst_distinct_bytes);
  put(o, "gst_sectors", t.gst_sectors);
  for (const auto* m : {&t.gld_by_width, &t.gst_by_width}) {
    o << ",\"" << (m == &t.gld_by_width ? "gld" : "gst") << "_requests_by_width\":{";
    bool first = true;
    for (const auto& [w, n] : *m) {
      o << (first ? "" : ",") << "\"" << w << "\":" << n;
      first = false;
    }
    o << "}";
  }
  put(o, "dram_read_bytes_min", uint64_t(L.read_sectors.size()) * 32);
  put(o, "dram_write_bytes_min", uint64_t(L.written_sectors.size()) * 32);
  put_shared(o, "smem_ld", t.smem_ld);
  put_shared(o, "smem_st", t.smem_st);
  put_shared(o, "ldmatrix", t.ldmatrix);
  put(o, "ldmatrix_bytes", t.ldmatrix_bytes);
  put(o, "cp_async_requests", t.cp_async_requests);
  put(o, "cp_async_bytes", t.cp_async_bytes);
  put(o, "cp_async_src_bytes", t.cp_async_src_bytes);
  put(o, "cp_async_src_distinct_bytes", t.cp_async_src_distinct_bytes);
  put(o, "cp_async_sectors", t.cp_async_sectors);
  put_shared(o, "cp_async_smem", t.cp_async_smem);
  put(o, "mma_m16n8k16_f16", t.mma[0]);
  put(o, "mma_m16n8k16_bf16", t.mma[1]);
  put(o, "mma_m16n8k8_tf32", t.mma[2]);
  put(o, "local_ld_bytes", t.local_ld_bytes);
  put(o, "local_st_bytes", t.local_st_bytes);
  put(o, "requests", t.requests);
  put(o, "diverged_requests", t.diverged_requests);
  o << "}";
  return o.str();
}

}  // namespace

// The hooks' entry: one load and a predictable branch when nothing is counted.
inline void on_access_hook(void* p, unsigned size, bool write, const void* site) {
  if (__builtin_expect(g_lane != nullptr, 0)) on_access(reinterpret_cast<uintptr_t>(p), size, write, site);
}

void set_lane(const LaneContext* lane) { g_lane = lane; }
const LaneContext* lane() { return g_lane; }

bool active() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_active;
}

void begin_launch(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes, const void* params,
                  size_t param_bytes) {
  std::lock_guard<std::mutex> lock(g_mutex);
  delete g_launch;
  g_launch = new Launch;
  g_launch->kernel = kernel;
  g_launch->grid = grid;
  g_launch->block = block;
  g_launch->smem_bytes = smem_bytes;
  g_owner = pthread_self();
  host_stack_of_this_thread(&g_param_lo, &g_param_hi);
  if (params && (reinterpret_cast<uintptr_t>(params) < g_param_lo ||
                 reinterpret_cast<uintptr_t>(params) + param_bytes > g_param_hi)) {
    g_param_lo = reinterpret_cast<uintptr_t>(params);  // arguments outside the stack: exactly their copy
    g_param_hi = g_param_lo + param_bytes;
  }
  g_buf.clear();
}

void begin_block(const void*, size_t, const std::vector<LaneContext>& lanes) {
  if (!g_launch) return;
  ++g_launch->t.blocks;
  g_launch->t.threads += lanes.size();
}

void epoch_end() { flush(); }

void end_block(uint64_t barriers) {
  if (g_launch) g_launch->t.barriers += barriers;
}

void end_launch(bool failed) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_lane = nullptr;
  if (g_launch && !failed && g_active) g_records.push_back(to_json(*g_launch));
  delete g_launch;
  g_launch = nullptr;
  g_buf.clear();
}

void set_shared_window(const void* smem, size_t bytes) {
  g_smem_lo = reinterpret_cast<uintptr_t>(smem);
  g_smem_hi = g_smem_lo + (smem ? bytes : 0);
}

void launch_starting() { refresh_static_ranges(); }

Space classify(uintptr_t addr, const LaneContext* lane) { return space_of(addr, lane); }

void count_mma(int kind) {
  if (g_launch && kind >= 0 && kind < 3) {
    ++g_launch->t.mma[kind];
    ++g_launch->t.requests;
  }
}

void count_ldmatrix(int matrices, const uintptr_t* rows) {
  if (!g_launch) return;
  ++g_launch->t.requests;
  g_launch->t.ldmatrix_bytes += uint64_t(matrices) * 128;
  ++g_launch->t.ldmatrix.requests;
  for (int m = 0; m < matrices; ++m) {  // one phase per 8x8 matrix: 8 rows of 16 bytes
    std::vector<uint64_t> w;
    for (int r = 0; r < 8; ++r)
      for (int k = 0; k < 4; ++k) w.push_back((rows[m * 8 + r] >> 2) + k);
    std::sort(w.begin(), w.end());
    w.erase(std::unique(w.begin(), w.end()), w.end());
    unsigned per_bank[32] = {};
    unsigned most = 0;
    for (uint64_t x : w) most = std::max(most, ++per_bank[x & 31]);
    g_launch->t.ldmatrix.wavefronts += most;
    g_launch->t.ldmatrix.ideal += 1;
  }
}

void record_cp_async(const LaneContext& lane, const void* site, uintptr_t dst, int cp_size, uintptr_t src,
                     int src_size) {
  if (!g_launch || !pthread_equal(pthread_self(), g_owner)) return;
  const uintptr_t s = reinterpret_cast<uintptr_t>(site);
  g_buf.push_back({s, src, lane.warp, uint8_t(lane.lane), uint8_t(kCpAsyncGlobal), uint16_t(src_size)});
  g_buf.push_back({s, dst, lane.warp, uint8_t(lane.lane), uint8_t(kCpAsyncShared), uint16_t(cp_size)});
}

void count_warp_op() {
  if (g_launch) ++g_launch->t.warp_ops;
}

}  // namespace counters
}  // namespace internal

bool counters_built() { return internal::counters::g_instrumented; }

void profile_start() {
  std::lock_guard<std::mutex> lock(internal::counters::g_mutex);
  internal::counters::g_records.clear();
  internal::counters::g_active = true;
}

std::string profile_stop() {
  std::lock_guard<std::mutex> lock(internal::counters::g_mutex);
  internal::counters::g_active = false;
  std::string out = "[";
  for (size_t i = 0; i < internal::counters::g_records.size(); ++i) {
    out += (i ? ",\n" : "") + internal::counters::g_records[i];
  }
  internal::counters::g_records.clear();
  return out + "]";
}

}  // namespace emu
}  // namespace rk

// ---- the hooks g++ -fsanitize=thread calls (no ThreadSanitizer runtime is linked) ------------------------
// Memory accesses go to the counters; atomics are performed (sequentially consistent, which is at least as
// strong as any order the caller asked for). Hidden symbols: they bind within this module only.

using rk::emu::internal::counters::on_access_hook;

extern "C" {

void __tsan_init() { rk::emu::internal::counters::g_instrumented = true; }
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}

#define RK_EMU_ACCESS_HOOK(N)                                                                                \
  void __tsan_read##N(void* p) { on_access_hook(p, N, false, __builtin_return_address(0)); }                \
  void __tsan_write##N(void* p) { on_access_hook(p, N, true, __builtin_return_address(0)); }                \
  void __tsan_unaligned_read##N(void* p) { on_access_hook(p, N, false, __builtin_return_address(0)); }      \
  void __tsan_unaligned_write##N(void* p) { on_access_hook(p, N, true, __builtin_return_address(0)); }      \
  void __tsan_volatile_read##N(void* p) { on_access_hook(p, N, false, __builtin_return_address(0)); }       \
  void __tsan_volatile_write##N(void* p) { on_access_hook(p, N, true, __builtin_return_address(0)); }
RK_EMU_ACCESS_HOOK(1)
RK_EMU_ACCESS_HOOK(2)
RK_EMU_ACCESS_HOOK(4)
RK_EMU_ACCESS_HOOK(8)
RK_EMU_ACCESS_HOOK(16)
#undef RK_EMU_ACCESS_HOOK

void __tsan_read_range(void* p, unsigned long n) { on_access_hook(p, unsigned(n), false, __builtin_return_address(0)); }
void __tsan_write_range(void* p, unsigned long n) { on_access_hook(p, unsigned(n), true, __builtin_return_address(0)); }

#define RK_EMU_ATOMIC_HOOKS(BITS, T)                                                                         \
  T __tsan_atomic##BITS##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); }   \
  void __tsan_atomic##BITS##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); }   \
  T __tsan_atomic##BITS##_exchange(volatile T* a, T v, int) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##BITS##_fetch_add(volatile T* a, T v, int) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##BITS##_fetch_sub(volatile T* a, T v, int) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##BITS##_fetch_and(volatile T* a, T v, int) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##BITS##_fetch_or(volatile T* a, T v, int) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }   \
  T __tsan_atomic##BITS##_fetch_xor(volatile T* a, T v, int) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##BITS##_fetch_nand(volatile T* a, T v, int) {                                              \
    return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST);                                                      \
  }                                                                                                          \
  int __tsan_atomic##BITS##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {                   \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                  \
  }                                                                                                          \
  int __tsan_atomic##BITS##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {                     \
    return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                   \
  }                                                                                                          \
  T __tsan_atomic##BITS##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                         \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                        \
    return c;                                                                                                \
  }
RK_EMU_ATOMIC_HOOKS(8, unsigned char)
RK_EMU_ATOMIC_HOOKS(16, unsigned short)
RK_EMU_ATOMIC_HOOKS(32, unsigned int)
RK_EMU_ATOMIC_HOOKS(64, unsigned long long)
#undef RK_EMU_ATOMIC_HOOKS

void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }

}  // extern "C"
