// The CPU Winograd kernel's one fact other files need.
#pragma once

namespace resnet_fused {

// Whether winograd_conv3x3 runs its Winograd kernel on this machine (built with
// it, and the CPU has AVX-512); otherwise the op computes through conv_bias_act.
bool winograd_supported();

}  // namespace resnet_fused
