// Whether grouped_conv3x3 runs its own kernel here (else it computes through
// conv_bias_act): built with it, and the CPU has AVX2+FMA or AVX-512.
#pragma once

namespace resnet_fused {

bool grouped_conv_kernel_available();

}  // namespace resnet_fused
