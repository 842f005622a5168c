// The CPU conv_bias_act kernel, for the CPU ops that fall back to it.
#pragma once

#include <ATen/ATen.h>

namespace resnet_fused {

at::Tensor conv_bias_act_cpu(const at::Tensor& input, const at::Tensor& weight,
                             const c10::optional<at::Tensor>& bias,
                             const c10::optional<at::Tensor>& residual, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                             bool relu, bool assume_finite);

}  // namespace resnet_fused
