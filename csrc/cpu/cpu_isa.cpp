#include "cpu/cpu_isa.h"

#include <cstdlib>
#include <cstring>

namespace resnet_fused {
namespace {

CpuIsa detect() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return CpuIsa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::kAvx2;
#endif
  return CpuIsa::kNone;
}

CpuIsa cap_from_env() {
  const char* v = std::getenv("RESNET_FUSED_CPU_ISA");
  if (v == nullptr || *v == '\0') return CpuIsa::kAvx512;
  if (std::strcmp(v, "avx512") == 0) return CpuIsa::kAvx512;
  if (std::strcmp(v, "avx2") == 0) return CpuIsa::kAvx2;
  if (std::strcmp(v, "none") == 0) return CpuIsa::kNone;
  return CpuIsa::kAvx512;  // resnet_fused/_extension.py warns about other values
}

}  // namespace

CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
    const CpuIsa have = detect(), cap = cap_from_env();
    return static_cast<int>(have) < static_cast<int>(cap) ? have : cap;
  }();
  return isa;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "none";
  }
}

}  // namespace resnet_fused
