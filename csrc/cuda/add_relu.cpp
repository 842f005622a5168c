// CUDA add_relu / add_relu_: checks, layouts and the launch (host code; the
// kernel is in add_relu_kernels.cu). relu(a + b), memory bound: dense tensors of
// one layout are treated as flat arrays.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "launch.h"

namespace resnet_fused {
namespace {

using at::Tensor;

using Launcher = cudaError_t (*)(void*, const void*, const void*, int64_t, bool, int, int,
                                 cudaStream_t);

Launcher launcher_for(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return launch_add_relu<float>;
    case at::kDouble: return launch_add_relu<double>;
    case at::kHalf: return launch_add_relu<__half>;
    case at::kBFloat16: return launch_add_relu<__nv_bfloat16>;
    default:
      TORCH_CHECK(false, "add_relu (CUDA kernel): expected float16, bfloat16, float32 or float64 "
                  "tensors, got ", dtype);
  }
}

// out, a, b: dense, same sizes and strides.
void launch(Tensor& out, const Tensor& a, const Tensor& b) {
  const int64_t n = out.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool vec = aligned(out.data_ptr(), 16) && aligned(a.const_data_ptr(), 16) &&
                   aligned(b.const_data_ptr(), 16);
  const int threads = 256;
  const int64_t work = vec ? (n * out.element_size() + 15) / 16 : n;
  const int64_t max_blocks = at::cuda::getCurrentDeviceProperties()->multiProcessorCount * 8;
  const int blocks =
      static_cast<int>(std::max<int64_t>(1, std::min((work + threads - 1) / threads, max_blocks)));
  const Launcher launch_kernel = launcher_for(out.scalar_type());
  C10_CUDA_CHECK(launch_kernel(out.data_ptr(), a.const_data_ptr(), b.const_data_ptr(), n, vec,
                               blocks, threads, stream.stream()));
}

// A dense tensor (no gaps, no overlap) whose layout b can be made to share.
bool dense(const Tensor& t) { return t.is_non_overlapping_and_dense(); }

void check_cuda(const Tensor& a) {
  TORCH_CHECK(a.is_cuda(), "add_relu (CUDA kernel): expected tensors on a CUDA device, got ", a.device());
}

Tensor add_relu_cuda(const Tensor& a, const Tensor& b) {
  check_add_relu_args(a, b);
  check_cuda(a);
  Tensor a_d = dense(a) ? a : a.contiguous(a.suggest_memory_format());
  Tensor out = at::empty_like(a_d);  // preserves a_d's strides
  Tensor b_d = b.strides() == a_d.strides() && dense(b) ? b : at::empty_like(a_d).copy_(b);
  launch(out, a_d, b_d);
  return out;
}

void add_relu_cuda_(Tensor& a, const Tensor& b) {
  check_add_relu_inplace_args(a, b);
  check_cuda(a);
  if (!dense(a)) {
    a.copy_(add_relu_cuda(a, b));
    return;
  }
  Tensor b_d = b.strides() == a.strides() && dense(b) ? b : at::empty_like(a).copy_(b);
  launch(a, a, b_d);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("add_relu", &add_relu_cuda);
  m.impl("add_relu_", &add_relu_cuda_);
}

}  // namespace resnet_fused
