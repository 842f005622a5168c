// Argument validation shared by every backend of resnet_fused's ops. Messages
// name the argument, what was expected and what was got.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Optional.h>

#include <vector>

namespace resnet_fused {

// Output size (N, K, spatial...) of a convolution, or a clear error when the
// (padded) input is smaller than the dilated kernel.
inline std::vector<int64_t> conv_output_size(
    const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, const char* op = "conv_bias_act") {
  std::vector<int64_t> out{input.size(0), weight.size(0)};
  for (int64_t d = 0; d < input.dim() - 2; ++d) {
    const int64_t in = input.size(d + 2) + 2 * padding[d];
    const int64_t k = dilation[d] * (weight.size(d + 2) - 1) + 1;
    TORCH_CHECK(in >= k, op, ": input spatial size ", input.sizes().slice(2),
                " with padding ", padding, " is smaller than the kernel ",
                weight.sizes().slice(2), " with dilation ", dilation);
    out.push_back((in - k) / stride[d] + 1);
  }
  return out;
}

// volumes: 3-D convolutions (5-D tensors) are accepted too (the CPU backend's).
inline void check_conv_bias_act_args(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, const char* op = "conv_bias_act",
    bool volumes = false) {
  if (volumes) {
    TORCH_CHECK(input.dim() == 4 || input.dim() == 5, op,
                ": expected input to be 4-D (N, C, H, W) or 5-D (N, C, D, H, W), got ",
                input.dim(), "-D with shape ", input.sizes());
  } else {
    TORCH_CHECK(input.dim() == 4, op, ": expected input to be 4-D (N, C, H, W), got ",
                input.dim(), "-D with shape ", input.sizes());
  }
  const int64_t dims = input.dim() - 2;
  TORCH_CHECK(weight.dim() == input.dim(), op, ": expected weight to be ", input.dim(),
              dims == 2 ? "-D (K, C/groups, R, S)" : "-D (K, C/groups, T, R, S)",
              " like the input, got ", weight.dim(), "-D with shape ", weight.sizes());
  TORCH_CHECK(input.is_floating_point(), op, ": expected a floating-point input, got ",
              input.scalar_type());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), op, ": expected weight dtype ",
              input.scalar_type(), " (the input's), got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == input.device(), op, ": expected weight on ",
              input.device(), " (the input's device), got ", weight.device());
  TORCH_CHECK(static_cast<int64_t>(stride.size()) == dims &&
                  static_cast<int64_t>(padding.size()) == dims &&
                  static_cast<int64_t>(dilation.size()) == dims,
              op, ": expected stride, padding and dilation of length ", dims,
              " (the input's spatial dimensions), got ", stride, ", ", padding, ", ", dilation);
  for (int64_t d = 0; d < dims; ++d) {
    TORCH_CHECK(stride[d] > 0, op, ": expected stride > 0, got ", stride);
    TORCH_CHECK(dilation[d] > 0, op, ": expected dilation > 0, got ", dilation);
    TORCH_CHECK(padding[d] >= 0, op, ": expected padding >= 0, got ", padding);
  }
  TORCH_CHECK(groups > 0, op, ": expected groups > 0, got ", groups);
  TORCH_CHECK(weight.size(0) % groups == 0, op, ": expected weight.size(0) (",
              weight.size(0), " output channels) divisible by groups=", groups);
  TORCH_CHECK(input.size(1) == weight.size(1) * groups, op, ": expected input with ",
              weight.size(1) * groups, " channels (weight.size(1)=", weight.size(1),
              " x groups=", groups, "), got input of shape ", input.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0),
                op, ": expected bias of shape [", weight.size(0), "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == input.scalar_type(), op, ": expected bias dtype ",
                input.scalar_type(), ", got ", bias->scalar_type());
    TORCH_CHECK(bias->device() == input.device(), op, ": expected bias on ", input.device(),
                ", got ", bias->device());
  }
  const auto out_size = conv_output_size(input, weight, stride, padding, dilation, op);
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(out_size),
                op, ": expected residual of the output's shape ", at::IntArrayRef(out_size),
                ", got ", residual->sizes());
    TORCH_CHECK(residual->scalar_type() == input.scalar_type(),
                op, ": expected residual dtype ", input.scalar_type(), ", got ",
                residual->scalar_type());
    TORCH_CHECK(residual->device() == input.device(), op, ": expected residual on ",
                input.device(), ", got ", residual->device());
  }
}

// pack_weight's arguments: a weight and the input size it will see, whose channels
// must match weight.size(1) * groups.
// volumes: 5-D ones too (the CPU backend's).
inline void check_pack_weight_args(const at::Tensor& weight, int64_t groups,
                                   at::IntArrayRef input_size, bool volumes = false) {
  TORCH_CHECK(weight.dim() == 4 || (volumes && weight.dim() == 5), "pack_weight: expected a ",
              volumes ? "4-D or 5-D" : "4-D", " weight, got shape ", weight.sizes());
  TORCH_CHECK(static_cast<int64_t>(input_size.size()) == weight.dim(), "pack_weight: expected a ",
              weight.dim(), "-D input_size (the weight's), got ", input_size);
  TORCH_CHECK(groups >= 1 && weight.size(0) % groups == 0, "pack_weight: expected groups >= 1 ",
              "dividing weight.size(0) (", weight.size(0), " output channels), got groups=", groups);
  TORCH_CHECK(input_size[1] == weight.size(1) * groups, "pack_weight: expected ",
              "input_size[1] = weight.size(1) * groups = ", weight.size(1), " * ", groups,
              " input channels, got input_size ", input_size);
}

inline void check_add_relu_args(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.sizes() == b.sizes(), "add_relu: expected b of a's shape ", a.sizes(), ", got ",
              b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "add_relu: expected b of a's dtype ",
              a.scalar_type(), ", got ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), "add_relu: expected b on a's device ", a.device(), ", got ",
              b.device());
  TORCH_CHECK(a.is_floating_point(), "add_relu: expected floating-point tensors, got ",
              a.scalar_type());
}

// add_relu_ writes a while reading b: b may be a itself (same elements, same
// order), but any other overlap would read values already overwritten. Overlap
// that get_overlap_status cannot decide (TooHard: a or b not dense) is the
// backends' to make safe.
inline void check_add_relu_inplace_args(const at::Tensor& a, const at::Tensor& b) {
  check_add_relu_args(a, b);
  TORCH_CHECK(at::has_internal_overlap(a) != at::MemOverlap::Yes,
              "add_relu_: expected a without internal overlap (e.g. not an expanded tensor), got "
              "strides ", a.strides());
  const auto overlap = at::get_overlap_status(a, b);
  TORCH_CHECK(overlap != at::MemOverlapStatus::Partial &&
                  (overlap != at::MemOverlapStatus::Full || a.strides() == b.strides()),
              "add_relu_: expected b to be a itself or not to overlap a's memory, got b partly "
              "overlapping a (a: sizes ", a.sizes(), " strides ", a.strides(), "; b: strides ",
              b.strides(), ")");
}

// Output spatial size of max_pool2d (no dilation, floor rounding), after checking
// its arguments. padding <= kernel / 2, as torch requires, so that no window lies
// wholly in the padding.
// half: float16 is accepted too (the CUDA kernel's dtypes).
inline std::vector<int64_t> check_max_pool2d_args(const at::Tensor& input,
                                                  at::IntArrayRef kernel_size,
                                                  at::IntArrayRef stride,
                                                  at::IntArrayRef padding, bool half = false) {
  const char* op = "max_pool2d";
  TORCH_CHECK(input.dim() == 4, op, ": expected input to be 4-D (N, C, H, W), got ",
              input.dim(), "-D with shape ", input.sizes());
  TORCH_CHECK(input.size(1) > 0 && input.size(2) > 0 && input.size(3) > 0, op,
              ": expected input with non-empty channel and spatial dimensions (only the batch "
              "may be empty), got shape ", input.sizes());
  const auto dt = input.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || (half && dt == at::kHalf), op,
              half ? ": expected float16, bfloat16 or float32 input, got "
                   : ": expected float32 or bfloat16 input, got ",
              dt);
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2, op,
              ": expected kernel_size, stride and padding of length 2, got ", kernel_size, ", ",
              stride, ", ", padding);
  std::vector<int64_t> out;
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK(kernel_size[d] > 0, op, ": expected kernel_size > 0, got ", kernel_size);
    TORCH_CHECK(stride[d] > 0, op, ": expected stride > 0, got ", stride);
    TORCH_CHECK(padding[d] >= 0 && 2 * padding[d] <= kernel_size[d], op,
                ": expected 0 <= padding <= kernel_size / 2, got padding ", padding,
                " with kernel_size ", kernel_size);
    const int64_t in = input.size(d + 2) + 2 * padding[d];
    TORCH_CHECK(in >= kernel_size[d], op, ": input spatial size ", input.sizes().slice(2),
                " with padding ", padding, " is smaller than the kernel ", kernel_size);
    out.push_back((in - kernel_size[d]) / stride[d] + 1);
  }
  return out;
}

// The memory format an op returns: the input's (NCHW or channels_last).
inline at::MemoryFormat output_memory_format(const at::Tensor& input) {
  return input.suggest_memory_format();
}

}  // namespace resnet_fused
