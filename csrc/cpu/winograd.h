// Whether winograd_conv3x3 runs its own kernel here (else it computes through
// conv_bias_act): built with it, and the CPU has AVX2+FMA or AVX-512.
#pragma once

namespace resnet_fused {

bool winograd_kernel_available();

// Whether it also runs its bfloat16 kernel here: AVX-512 and a bfloat16 brgemm that
// runs on this CPU (AVX512_BF16 or AMX; plain AVX-512 has none).
bool winograd_bf16_kernel_available();

}  // namespace resnet_fused
