// CPU mean_linear: linear(input averaged over its spatial dims, weight, bias), ResNet's
// head (adaptive average pool to 1x1, flatten, fc) as one op. At batch 1 the head is a
// matrix-vector product that streams the fc weight from memory (8 MB for ResNet-50's
// 2048 x 1000); done by ATen's pooling and oneDNN's inner product it also pays two ops'
// worth of dispatch and setup on code that is out of cache after the trunk. Here it is
// two plain loops, and the model records it into its op plan (resnet_fused/op_plan.py).
//
// Each dot product sums in 16 interleaved partial sums (element c into sum c % 16), then
// adds those in order: the compiler vectorizes that for any x86-64 without reordering
// a sum, so every CPU gives the same bits, with the rounding error of a 16-way
// blocked sum.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

namespace resnet_fused {
namespace {

using at::Tensor;
using c10::optional;

constexpr int64_t kLanes = 16;

float dot(const float* w, const float* x, int64_t n) {
  float acc[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += w[c + l] * x[c + l];
  }
  for (int64_t l = 0; c + l < n; ++l) acc[l] += w[c + l] * x[c + l];
  float sum = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) sum += acc[l];
  return sum;
}

void check_args(const Tensor& input, const Tensor& weight, const optional<Tensor>& bias) {
  constexpr const char* op = "mean_linear";
  TORCH_CHECK(input.dim() == 4, op, ": expected input to be 4-D (N, C, H, W), got ", input.dim(),
              "-D with shape ", input.sizes());
  TORCH_CHECK(input.size(2) * input.size(3) > 0, op,
              ": expected input with a non-empty spatial size, got shape ", input.sizes());
  TORCH_CHECK(input.scalar_type() == at::kFloat, op, ": expected float32 input, got ",
              input.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == input.size(1), op,
              ": expected weight of shape (K, ", input.size(1), ") for input with ",
              input.size(1), " channels, got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kFloat, op, ": expected weight float32, got ",
              weight.scalar_type());
  TORCH_CHECK(input.device().is_cpu() && weight.device().is_cpu(), op,
              ": expected input and weight on cpu, got ", input.device(), " and ",
              weight.device());
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) &&
                    bias->scalar_type() == at::kFloat && bias->device().is_cpu(),
                op, ": expected bias of shape (", weight.size(0), ") float32 on cpu, got ",
                bias->sizes(), " ", bias->scalar_type(), " on ", bias->device());
  }
}

Tensor mean_linear_cpu(const Tensor& input, const Tensor& weight, const optional<Tensor>& bias) {
  check_args(input, weight, bias);
  const int64_t N = input.size(0), C = input.size(1), K = weight.size(0);
  const int64_t HW = input.size(2) * input.size(3);
  // The means, [N, C]: channels_last input adds whole pixels (C contiguous values) in
  // pixel order, NCHW input each channel's plane; either way each mean is its values
  // summed in order, then divided by their count.
  const Tensor x = input.contiguous(input.suggest_memory_format());
  const bool cl = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  std::vector<float> mean(N * C, 0.0f);
  const float* px = x.const_data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) {
    float* m = mean.data() + n * C;
    const float* img = px + n * C * HW;
    if (cl) {
      for (int64_t p = 0; p < HW; ++p) {
        for (int64_t c = 0; c < C; ++c) m[c] += img[p * C + c];
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t p = 0; p < HW; ++p) m[c] += img[c * HW + p];
      }
    }
    for (int64_t c = 0; c < C; ++c) m[c] /= static_cast<float>(HW);
  }
  const Tensor w = weight.contiguous();
  const Tensor b = bias ? bias->contiguous() : Tensor();
  Tensor out = at::empty({N, K}, input.options().memory_format(at::MemoryFormat::Contiguous));
  const float* pw = w.const_data_ptr<float>();
  const float* pb = bias ? b.const_data_ptr<float>() : nullptr;
  float* po = out.data_ptr<float>();
  // Rows of the weight split across threads; each row is read once for all images.
  at::parallel_for(0, K, 16, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      for (int64_t n = 0; n < N; ++n) {
        po[n * K + k] = dot(pw + k * C, mean.data() + n * C, C) + (pb ? pb[k] : 0.0f);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) { m.impl("mean_linear", &mean_linear_cpu); }

}  // namespace resnet_fused
