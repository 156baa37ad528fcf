// The emulator's tensor-core and asynchronous-copy instructions (csrc/cuda/kernels/ptx.cuh calls them under
// RK_EMULATOR): mma.sync and ldmatrix as warp collectives that follow the PTX ISA's fragment layouts lane by
// lane, and cp.async with per-thread commit groups that land in shared memory only when waited for.
//
// Rounding: the tensor cores' internal accumulation order and rounding are not documented. Here every product
// of two f16/bf16/tf32 values is exact in fp32 (at most 22 significant bits), and the products are added to the
// fp32 accumulator one k at a time, in k order, each sum rounded to nearest-even. A GPU may differ from this in
// the last bits of a sum.
#include <cstring>

#include "emu/emu_internal.h"

namespace rk {
namespace emu {
namespace {

float f16_to_float(uint16_t bits) {
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}

float bf16_to_float(uint16_t bits) {
  const uint32_t w = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}

// A .tf32 operand is the upper 19 bits of its .b32 register: the 13 low mantissa bits are ignored.
float tf32_to_float(uint32_t bits) {
  const uint32_t w = bits & 0xffffe000u;
  float f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}

uint16_t half_of(uint32_t reg, int hi) { return static_cast<uint16_t>(hi ? reg >> 16 : reg & 0xffffu); }

// D = A * B + C for one warp, m16n8k16 (f16/bf16) or m16n8k8 (tf32), fragments as in the PTX ISA:
// groupID = lane / 4, tig = lane % 4; C/D element i of a lane is (row groupID + 8 * (i >= 2), col 2 tig + i % 2).
std::string mma(Collective kind, void* const* payloads, int nlanes) {
  if (nlanes != internal::kWarpSize) return "mma.sync needs a full warp of 32 threads";
  const int K = kind == Collective::kMmaTF32 ? 8 : 16;
  float A[16][16], B[16][8], C[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const auto& op = *static_cast<const MmaOperands*>(payloads[lane]);
    const int g = lane >> 2, t = lane & 3;
    if (kind == Collective::kMmaTF32) {
      // A: a0 (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4); B: b0 (t, g), b1 (t + 4, g).
      for (int i = 0; i < 4; ++i) A[g + 8 * (i & 1)][t + 4 * (i >> 1)] = tf32_to_float(op.a[i]);
      for (int i = 0; i < 2; ++i) B[t + 4 * i][g] = tf32_to_float(op.b[i]);
    } else {
      // A: element i (register i / 2, half i % 2) at row g + 8 * ((i / 2) % 2), col 2 t + i % 2 + 8 * (i >= 4);
      // B: element i at row 2 t + i % 2 + 8 * (i >= 2), col g.
      const auto cvt = kind == Collective::kMmaF16 ? f16_to_float : bf16_to_float;
      for (int i = 0; i < 8; ++i) {
        A[g + 8 * ((i >> 1) & 1)][2 * t + (i & 1) + 8 * (i >> 2)] = cvt(half_of(op.a[i >> 1], i & 1));
      }
      for (int i = 0; i < 4; ++i) B[2 * t + (i & 1) + 8 * (i >> 1)][g] = cvt(half_of(op.b[i >> 1], i & 1));
    }
    for (int i = 0; i < 4; ++i) C[g + 8 * (i >> 1)][2 * t + (i & 1)] = op.c[i];
  }
  for (int lane = 0; lane < 32; ++lane) {
    auto& op = *static_cast<MmaOperands*>(payloads[lane]);
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
      float acc = C[row][col];
      for (int k = 0; k < K; ++k) acc += A[row][k] * B[k][col];
      op.d[i] = acc;
    }
  }
  internal::counters::count_mma(static_cast<int>(kind));
  return "";
}

// ldmatrix.m8n8.{x1,x2,x4}{.trans}.b16: lanes 8m..8m+7 give the row addresses of matrix m; lane l receives in
// register m the pair (row l / 4, cols 2 (l % 4), +1), or with .trans (rows 2 (l % 4), +1, col l / 4).
std::string ldmatrix(int variant, void* const* payloads, int nlanes) {
  if (nlanes != internal::kWarpSize) return "ldmatrix needs a full warp of 32 threads";
  const int matrices = variant & 7;
  const bool trans = (variant & 8) != 0;
  if (matrices != 1 && matrices != 2 && matrices != 4) return "ldmatrix: .num must be .x1, .x2 or .x4";
  uintptr_t rows[32];
  const internal::LaneContext* lane_ctx = nullptr;
  for (int r = 0; r < 8 * matrices; ++r) {
    rows[r] = reinterpret_cast<uintptr_t>(static_cast<const LdmatrixOperands*>(payloads[r])->row);
    if (rows[r] % 16) {
      return "ldmatrix: lane " + std::to_string(r) + "'s row address is not 16-byte aligned";
    }
    if (internal::counters::classify(rows[r], lane_ctx) != internal::counters::Space::kShared) {
      return "ldmatrix: lane " + std::to_string(r) + "'s row address is not in shared memory";
    }
  }
  auto elem = [&](int m, int row, int col) {
    uint16_t v;
    std::memcpy(&v, reinterpret_cast<const unsigned char*>(rows[m * 8 + row]) + 2 * col, sizeof(v));
    return v;
  };
  for (int lane = 0; lane < 32; ++lane) {
    auto& op = *static_cast<LdmatrixOperands*>(payloads[lane]);
    for (int m = 0; m < matrices; ++m) {
      const int a = lane >> 2, b = 2 * (lane & 3);
      const uint16_t lo = trans ? elem(m, b, a) : elem(m, a, b);
      const uint16_t hi = trans ? elem(m, b + 1, a) : elem(m, a, b + 1);
      op.r[m] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
  }
  internal::counters::count_ldmatrix(matrices, rows);
  return "";
}

std::string where(const char* file, int line) { return std::string(file ? file : "?") + ":" + std::to_string(line); }

}  // namespace

namespace internal {

std::string resolve_collective(int kind, int variant, void* const* payloads, int nlanes) {
  switch (static_cast<Collective>(kind)) {
    case Collective::kMmaF16:
    case Collective::kMmaBF16:
    case Collective::kMmaTF32: return mma(static_cast<Collective>(kind), payloads, nlanes);
    case Collective::kLdmatrix: return ldmatrix(variant, payloads, nlanes);
  }
  return "unknown warp-collective instruction";
}

}  // namespace internal

void cp_async(void* smem_dst, const void* gmem_src, int cp_size, int src_size, bool cache_global, const char* file,
              int line) {
  const void* site = __builtin_return_address(0);
  internal::RuntimeScope runtime;
  const internal::LaneContext& lane = internal::current_lane();
  const std::string at = "cp.async at " + where(file, line) + ": ";
  if (cp_size != 4 && cp_size != 8 && cp_size != 16) throw KernelError(at + "cp-size must be 4, 8 or 16");
  if (cache_global && cp_size != 16) throw KernelError(at + "cp.async.cg copies 16 bytes only");
  if (src_size < 0 || src_size > cp_size) throw KernelError(at + "src-size must be in [0, cp-size]");
  const uintptr_t dst = reinterpret_cast<uintptr_t>(smem_dst), src = reinterpret_cast<uintptr_t>(gmem_src);
  if (dst % cp_size || (src_size > 0 && src % cp_size)) {
    throw KernelError(at + "addresses must be aligned to cp-size (" + std::to_string(cp_size) + " bytes)");
  }
  if (internal::counters::classify(dst, &lane) != internal::counters::Space::kShared) {
    throw KernelError(at + "the destination is not in shared memory");
  }
  if (src_size > 0 && internal::counters::classify(src, &lane) != internal::counters::Space::kGlobal) {
    throw KernelError(at + "the source is not in global memory");
  }
  internal::PendingCopy copy;
  copy.dst = static_cast<unsigned char*>(smem_dst);
  copy.cp_size = cp_size;
  copy.src_size = src_size;
  copy.file = file;
  copy.line = line;
  if (src_size > 0) std::memcpy(copy.bytes, gmem_src, static_cast<size_t>(src_size));
  internal::current_cp_async_queue().uncommitted.push_back(copy);
  internal::counters::record_cp_async(lane, site, dst, cp_size, src, src_size);
}

void cp_async_commit(const char* /*file*/, int /*line*/) {
  internal::RuntimeScope runtime;
  auto& q = internal::current_cp_async_queue();
  q.groups.push_back(std::move(q.uncommitted));
  q.uncommitted.clear();
}

void cp_async_wait(int pending, const char* file, int line) {
  internal::RuntimeScope runtime;
  if (pending < 0) throw KernelError("cp.async.wait_group at " + where(file, line) + ": N must be >= 0");
  auto& q = internal::current_cp_async_queue();
  while (q.groups.size() > static_cast<size_t>(pending)) {
    for (const internal::PendingCopy& c : q.groups.front()) {
      std::memcpy(c.dst, c.bytes, static_cast<size_t>(c.src_size));
      std::memset(c.dst + c.src_size, 0, static_cast<size_t>(c.cp_size - c.src_size));
    }
    q.groups.pop_front();
  }
}

}  // namespace emu
}  // namespace rk
