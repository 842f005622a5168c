// What conv1x1 (conv1x1.cpp) computes with its own kernel here.
#pragma once

namespace resnet_fused {

// bfloat16 too: AVX-512 (its epilogue's) and a bfloat16 brgemm that runs (AVX512_BF16
// or AMX). float32 needs only the fp32 brgemm (brgemm_f32_available).
bool conv1x1_bf16_kernel_available();

}  // namespace resnet_fused
