// Which x86 vector instruction set a CPU kernel may use, decided at run time.
//
// The library is built without -march=native (it must run on any x86-64 machine), so kernels
// compile their AVX-512 and AVX2 functions alone with __attribute__((target(...))) and pick one
// per call with cpu_isa(). An environment variable per kernel can force a lesser set, so that the
// tests reach every kernel on one machine; a set the CPU lacks is never chosen, whatever the
// variable says (forcing avx512 on an AVX2-only CPU gives avx2).
#pragma once

#include <c10/util/Exception.h>

#include "fastad/env_choice.h"

#if defined(__linux__) && defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fastad {

enum class CpuIsa { kPortable, kAvx2, kAvx512 };  // in order: env_choice's indices

inline const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx2:
      return "avx2";
    default:
      return "portable";
  }
}

// Whether this CPU runs a set: AVX-512 needs only AVX512F (the kernels use nothing beyond it),
// AVX2 needs FMA as well. Asked once per process.
inline bool cpu_supports(CpuIsa isa) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  switch (isa) {
    case CpuIsa::kAvx512:
      return avx512;
    case CpuIsa::kAvx2:
      return avx2;
    default:
      return true;
  }
}

// The vector set to use now: the best one, or the lesser one named by the environment variable
// `env_name` (avx512, avx2 or portable; see env_choice).
inline CpuIsa cpu_isa(const char* env_name) {
  const auto wanted = static_cast<CpuIsa>(env_choice(env_name, {"portable", "avx2", "avx512"}));
  if (wanted == CpuIsa::kAvx512 && cpu_supports(CpuIsa::kAvx512)) return CpuIsa::kAvx512;
  if (wanted != CpuIsa::kPortable && cpu_supports(CpuIsa::kAvx2)) return CpuIsa::kAvx2;
  return CpuIsa::kPortable;
}

// Whether this CPU has AVX-512 VNNI with the byte and word instructions its int8 kernels use.
inline bool cpu_avx512_vnni() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vnni");
  return has;
}

// Whether AMX int8 tiles (Sapphire Rapids and later) can be used by this process: the CPU has
// AMX-TILE and AMX-INT8, and Linux granted the process the tile data state (a kernel must ask
// for it with arch_prctl before the first tile instruction, or that instruction faults). Asked
// once per process; the grant covers every thread.
inline bool cpu_amx_int8_ready() {
#if defined(__linux__) && defined(__x86_64__)
  static const bool ready = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = d & (1u << 24), int8 = d & (1u << 25);
    if (!tile || !int8) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ready;
#else
  return false;
#endif
}

}  // namespace fastad
