// CPU conv_bias_act: one oneDNN convolution primitive whose post-ops apply the
// bias, the residual sum and the ReLU inside the convolution kernel, reached
// through ATen's mkldnn ops. Without oneDNN (a torch built without it, or the
// rare call with a NaN/Inf operand, see below), a portable path runs ATen's
// convolution with its bias, then the residual add and ReLU in place.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/conv_bias_act.h"
#include "cpu/finite.h"

namespace resnet_fused {
namespace {

using at::Tensor;
using c10::optional;

using ScalarList = c10::List<optional<at::Scalar>>;

// mkldnn::_convolution_pointwise: conv + bias + unary post-op ("relu"/"none").
using PointwiseFn = Tensor(const Tensor&, const Tensor&, const optional<Tensor>&, at::IntArrayRef,
                           at::IntArrayRef, at::IntArrayRef, int64_t, c10::string_view,
                           ScalarList, optional<c10::string_view>);
// mkldnn::_convolution_pointwise_.binary: other = relu(other + conv + bias), in place.
using SumReluFn = Tensor&(Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&,
                          at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
                          c10::string_view, optional<at::Scalar>, optional<c10::string_view>,
                          ScalarList, optional<c10::string_view>);

struct OneDnnOps {
  optional<c10::TypedOperatorHandle<PointwiseFn>> pointwise;
  optional<c10::TypedOperatorHandle<SumReluFn>> sum_relu;
  bool bf16 = false;
};

// Looked up once: the ops exist only in torch builds with oneDNN.
const OneDnnOps& onednn() {
  static const OneDnnOps ops = [] {
    OneDnnOps o;
    auto& d = c10::Dispatcher::singleton();
    if (auto h = d.findSchema({"mkldnn::_convolution_pointwise", ""})) o.pointwise = h->typed<PointwiseFn>();
    if (auto h = d.findSchema({"mkldnn::_convolution_pointwise_", "binary"})) o.sum_relu = h->typed<SumReluFn>();
    if (auto h = d.findSchema({"mkldnn::_is_mkldnn_bf16_supported", ""}))
      o.bf16 = h->typed<bool()>().call();
    return o;
  }();
  return ops;
}

bool use_onednn(const Tensor& input) {
  const auto& o = onednn();
  if (!o.pointwise || !o.sum_relu || !at::globalContext().userEnabledMkldnn()) return false;
  return input.scalar_type() == at::kFloat || (input.scalar_type() == at::kBFloat16 && o.bf16);
}

void check_cpu(const Tensor& input, const Tensor& weight, const char* op) {
  TORCH_CHECK(input.device().is_cpu(), op, " (CPU kernel): expected input on cpu, got ",
              input.device());
  const auto dt = input.scalar_type();
  // float64 takes the portable path: for gradient checks, not for speed.
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kDouble,
              op, " on CPU supports float32, bfloat16 and float64 inputs, got ", dt);
  TORCH_CHECK(!weight.is_mkldnn() || use_onednn(input),
              op, ": weight was packed by pack_weight for oneDNN, which cannot run ", dt,
              " here; pass the unpacked weight");
}

// oneDNN's ReLU post-op maps NaN to 0, unlike torch.relu. A NaN can reach a
// ReLU only from a non-finite operand, so calls holding one take the portable
// path (all_finite, finite.h). A packed weight is not scanned: packing happens at
// fold time, where FusedResNet checks the folded weights once.

// channels_last for 4-D tensors, channels_last_3d for 5-D ones (3-D convolutions).
at::MemoryFormat channels_last(const Tensor& t) {
  return t.dim() == 5 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
}

// oneDNN fuses the in-place sum only when it sees the input as channels_last;
// a 1x1-spatial input is also plain-contiguous and reads as NCHW to it, unless
// the weight is already packed.
bool sum_fuses(const Tensor& x_channels_last, const Tensor& weight) {
  return weight.is_mkldnn() ||
         x_channels_last.suggest_memory_format() == channels_last(x_channels_last);
}

// The oneDNN that torch 2.14 ships gets some shapes outside ResNet's wrong, or
// crashes on them (found by tests/test_fuzz.py; each is a case in test_ops.py):
// - padding wider than half the dilated kernel (outputs that see only padding):
//   crashes in the fused residual sum (fp32) and in plain bf16 convolution;
// - a single output channel with a 1x1 output: wrong values from the fused ops;
// - bf16 with an output row or column of size 1 (3x3, stride 2 or 3): wrong
//   values, in torch's own F.conv2d too;
// - one input channel per group with strides that differ between the axes (1 along
//   H, 2 or 3 along W): wrong values where an output column has size 1, in torch's
//   own F.conv2d too where the input has channels_last's strides (which a
//   one-channel tensor may have while it also counts as contiguous), and from any
//   weight oneDNN packed for it.
// bf16 calls of the third kind are recomputed in fp32 (bf16 values are exact in
// fp32, and oneDNN accumulates bf16 in fp32 anyway), where that fault does not
// occur. The others (onednn_fusion_unsafe) take the portable path: ATen's plain
// convolution on a fresh NCHW copy of the input, which is right on them (on
// channels_last input it too crashed on an over-padded grouped 1x1 conv); bf16
// ones in fp32 as well; and pack_weight leaves the last kind's weights unpacked.
// 3-D convolutions are treated alike (an output extent of 1 along any axis).
bool anisotropic_single_channel(const Tensor& weight, at::IntArrayRef stride) {
  if (weight.size(1) != 1) return false;
  for (const int64_t s : stride) {
    if (s != stride[0]) return true;
  }
  return false;
}

bool onednn_fusion_unsafe(const Tensor& weight, at::IntArrayRef out_size, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation) {
  for (int64_t d = 0; d + 2 < weight.dim(); ++d) {
    const int64_t span = dilation[d] * (weight.size(d + 2) - 1) + 1;
    if (2 * padding[d] > span - 1) return true;
  }
  return (weight.size(0) == 1 && c10::multiply_integers(out_size.slice(2)) == 1) ||
         anisotropic_single_channel(weight, stride);
}

bool bf16_needs_fp32(const Tensor& input, const Tensor& weight, at::IntArrayRef out_size,
                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  if (input.scalar_type() != at::kBFloat16) return false;
  for (const int64_t extent : out_size.slice(2)) {
    if (extent == 1) return true;
  }
  return onednn_fusion_unsafe(weight, out_size, stride, padding, dilation);
}

Tensor to_float(const Tensor& t) { return (t.is_mkldnn() ? t.to_dense() : t).to(at::kFloat); }

optional<Tensor> to_float(const optional<Tensor>& t) {
  return t.has_value() ? optional<Tensor>(to_float(*t)) : c10::nullopt;
}

// Portable path, after at::convolution (which adds the bias): residual add and
// ReLU in place, with torch's NaN semantics.
void residual_relu_inplace(Tensor& out, const optional<Tensor>& residual, bool relu) {
  if (residual.has_value()) {
    out.add_(*residual);
  }
  if (relu) {
    out.relu_();
  }
}

}  // namespace

Tensor conv_bias_act_cpu(const Tensor& input, const Tensor& weight, const optional<Tensor>& bias,
                         const optional<Tensor>& residual, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                         bool relu, bool assume_finite) {
  check_conv_bias_act_args(input, weight, bias, residual, stride, padding, dilation, groups,
                           "conv_bias_act", /*volumes=*/true);
  check_cpu(input, weight, "conv_bias_act");
  const auto fmt = output_memory_format(input);
  const auto out_size = conv_output_size(input, weight, stride, padding, dilation);
  if (input.numel() == 0 || c10::multiply_integers(out_size) == 0) {
    // oneDNN rejects empty tensors. An empty output needs no arithmetic; an empty
    // input with a non-empty output (no input channels, or an image that is all
    // padding) sums nothing: act(bias [+ residual]).
    Tensor out = at::zeros(out_size, input.options().memory_format(fmt));
    if (out.numel() != 0) {
      if (bias.has_value()) {
        std::vector<int64_t> shape(out.dim(), 1);
        shape[1] = -1;
        out.add_(bias->reshape(shape));
      }
      residual_relu_inplace(out, residual, relu);
    }
    return out;
  }
  if (bf16_needs_fp32(input, weight, out_size, stride, padding, dilation)) {
    return conv_bias_act_cpu(to_float(input), to_float(weight), to_float(bias), to_float(residual),
                             stride, padding, dilation, groups, relu, assume_finite)
        .to(at::kBFloat16);
  }
  // NaN/Inf matter to a ReLU (see above) and to bf16, whose oneDNN kernels spread an
  // Inf to outputs that never see it (NCHW input with 3 or 5 channels); bf16 values
  // are exact in fp32, where both are right.
  const bool bf16 = input.scalar_type() == at::kBFloat16;
  const bool finite = !(relu || bf16) || assume_finite ||
                      (all_finite(input) && (!residual || all_finite(*residual)) &&
                       (weight.is_mkldnn() || all_finite(weight)) && (!bias || all_finite(*bias)));
  if (bf16 && !finite) {
    return conv_bias_act_cpu(to_float(input), to_float(weight), to_float(bias), to_float(residual),
                             stride, padding, dilation, groups, relu, assume_finite)
        .to(at::kBFloat16);
  }
  // The residual sum needs a channels_last input; the plain path takes either.
  const Tensor x = residual.has_value() ? input.contiguous(channels_last(input)) : input;
  const bool unsafe = onednn_fusion_unsafe(weight, out_size, stride, padding, dilation);
  if (!use_onednn(input) || !finite || unsafe || (residual.has_value() && !sum_fuses(x, weight))) {
    const Tensor w = weight.is_mkldnn() ? weight.to_dense() : weight;
    // (A fresh tensor: contiguous() keeps a one-channel input's channels_last strides.)
    const Tensor x_plain = unsafe ? at::empty(input.sizes(), input.options()).copy_(input) : input;
    Tensor out = at::convolution(x_plain, w, bias, stride, padding,
                                 dilation, false, std::vector<int64_t>(input.dim() - 2, 0), groups);
    residual_relu_inplace(out, residual, relu);
    return out.contiguous(fmt);
  }
  const auto& o = onednn();
  // ATen's oneDNN ops read the bias as dense.
  const optional<Tensor> b = bias.has_value() ? optional<Tensor>(bias->contiguous()) : c10::nullopt;
  if (!residual.has_value()) {
    Tensor out = o.pointwise->call(input, weight, b, padding, stride, dilation, groups,
                                   relu ? "relu" : "none", ScalarList(), c10::nullopt);
    return out.contiguous(fmt);
  }
  // oneDNN's out-of-place binary post-op measured slower than its in-place sum
  // post-op, so the residual is copied into the output, which the convolution
  // then accumulates into. The residual must be channels_last for the sum to fuse.
  Tensor out = at::empty(out_size, input.options().memory_format(channels_last(input)));
  out.copy_(*residual);
  if (relu) {
    o.sum_relu->call(out, x, weight, b, padding, stride, dilation, groups, "add", c10::nullopt,
                     c10::string_view("relu"), ScalarList(), c10::nullopt);
  } else {
    o.sum_relu->call(out, x, weight, b, padding, stride, dilation, groups, "add", c10::nullopt,
                     c10::nullopt, ScalarList(), c10::nullopt);
  }
  return out.contiguous(fmt);
}

namespace {

void conv_bias_add_relu_cpu_(Tensor& residual, const Tensor& input, const Tensor& weight,
                                const optional<Tensor>& bias, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                bool assume_finite) {
  constexpr const char* op = "conv_bias_add_relu_";
  check_conv_bias_act_args(input, weight, bias, residual, stride, padding, dilation, groups, op,
                           /*volumes=*/true);
  check_cpu(input, weight, op);
  if (residual.numel() == 0) return;
  const auto out_size = conv_output_size(input, weight, stride, padding, dilation);
  if (bf16_needs_fp32(input, weight, out_size, stride, padding, dilation)) {
    residual.copy_(conv_bias_act_cpu(input, weight, bias, residual, stride, padding, dilation,
                                     groups, /*relu=*/true, assume_finite));
    return;
  }
  const Tensor x = input.contiguous(channels_last(input));
  // oneDNN's sum post-op writes the output while the convolution still reads x, the
  // weight and the bias: sharing memory with any of them, it would read overwritten
  // values. Its ReLU turns NaN into 0, so every operand must be finite.
  const bool aliased = residual.is_alias_of(x) ||
                       (!weight.is_mkldnn() && residual.is_alias_of(weight)) ||  // packed: opaque
                       (bias.has_value() && residual.is_alias_of(*bias));
  const bool fusable = use_onednn(input) && sum_fuses(x, weight) && !aliased &&
                       !onednn_fusion_unsafe(weight, out_size, stride, padding, dilation) &&
                       residual.is_contiguous(channels_last(residual)) &&
                       (assume_finite ||
                        (all_finite(input) && all_finite(residual) &&
                         (weight.is_mkldnn() || all_finite(weight)) &&
                         (!bias.has_value() || all_finite(*bias))));
  if (fusable) {
    const optional<Tensor> b = bias.has_value() ? optional<Tensor>(bias->contiguous()) : c10::nullopt;
    onednn().sum_relu->call(residual, x, weight, b, padding, stride, dilation, groups, "add",
                            c10::nullopt, c10::string_view("relu"), ScalarList(), c10::nullopt);
    return;
  }
  // Any other layout: compute out of place, then write back once.
  residual.copy_(conv_bias_act_cpu(input, weight, bias, residual, stride, padding, dilation,
                                   groups, /*relu=*/true, assume_finite));
}

Tensor pack_weight_cpu(const Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups, at::IntArrayRef input_size) {
  check_pack_weight_args(weight, groups, input_size, /*volumes=*/true);
  if (!at::hasMKLDNN() || !use_onednn(weight) || anisotropic_single_channel(weight, stride)) {
    return weight.contiguous(channels_last(weight));  // nothing better to pack into
  }
  if (weight.dim() == 5) {
    return at::mkldnn_reorder_conv3d_weight(weight.contiguous().to_mkldnn(), padding, stride,
                                            dilation, groups, input_size);
  }
  return at::mkldnn_reorder_conv2d_weight(weight.contiguous().to_mkldnn(), padding, stride,
                                          dilation, groups, input_size);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("conv_bias_act", &conv_bias_act_cpu);
  m.impl("conv_bias_add_relu_", &conv_bias_add_relu_cpu_);
  m.impl("pack_weight", &pack_weight_cpu);
}

// A packed (oneDNN-layout) weight dispatches on MkldnnCPU.
TORCH_LIBRARY_IMPL(resnet_fused, MkldnnCPU, m) {
  m.impl("conv_bias_act", &conv_bias_act_cpu);
  m.impl("conv_bias_add_relu_", &conv_bias_add_relu_cpu_);
}

}  // namespace resnet_fused
