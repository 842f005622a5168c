// Which vector ISA our own CPU kernels run with, chosen once at run time.
//
// The library is compiled for baseline x86-64; the kernels that need AVX2+FMA or
// AVX-512 are compiled per ISA (kernels_avx2.cpp, kernels_avx512.cpp) and
// called only after cpu_isa() says the CPU has it. RESNET_FUSED_CPU_ISA=avx2
// (or none) caps the choice, so one machine can run another class's code path.
#pragma once

namespace resnet_fused {

enum class CpuIsa { kNone = 0, kAvx2 = 1, kAvx512 = 2 };

// The best ISA that this CPU has, this build supports and the cap allows.
CpuIsa cpu_isa();

// "avx512", "avx2" or "none".
const char* cpu_isa_name(CpuIsa isa);

}  // namespace resnet_fused
