// Whether stem_conv runs its own kernel here (else it computes through conv_bias_act):
// built with it, and the CPU has AVX2+FMA or AVX-512.
#pragma once

namespace resnet_fused {

bool stem_conv_kernel_available();

}  // namespace resnet_fused
