// CUDA add_relu: relu(a + b), memory bound. Dense tensors of one layout are
// treated as flat arrays and moved 16 bytes at a time, with a scalar tail.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "checks.h"

namespace resnet_fused {
namespace {

using at::Tensor;

template <typename T>
__device__ __forceinline__ T add_relu_one(T x, T y) {
  using acc_t = at::opmath_type<T>;
  const acc_t v = static_cast<acc_t>(x) + static_cast<acc_t>(y);
  return static_cast<T>(v < acc_t(0) ? acc_t(0) : v);  // NaN passes, as in torch.relu
}

// 16-byte aligned chunks in the grid-stride loop, then the remainder one by one.
// No __restrict__: the in-place variant passes out == a.
template <typename T>
__global__ void add_relu_kernel(T* out, const T* a,
                                const T* b, int64_t n, bool vectorized) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t tid = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t done = 0;
  if (vectorized) {
    const int64_t nvec = n / kVec;
    for (int64_t v = tid; v < nvec; v += nthreads) {
      uint4 ra = reinterpret_cast<const uint4*>(a)[v];
      uint4 rb = reinterpret_cast<const uint4*>(b)[v];
      T* ea = reinterpret_cast<T*>(&ra);
      const T* eb = reinterpret_cast<const T*>(&rb);
#pragma unroll
      for (int k = 0; k < kVec; ++k) ea[k] = add_relu_one(ea[k], eb[k]);
      reinterpret_cast<uint4*>(out)[v] = ra;
    }
    done = nvec * kVec;
  }
  for (int64_t i = done + tid; i < n; i += nthreads) out[i] = add_relu_one(a[i], b[i]);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// out, a, b: dense, same sizes and strides.
void launch(Tensor& out, const Tensor& a, const Tensor& b) {
  const int64_t n = out.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "add_relu_cuda", [&] {
    const bool vec = aligned16(out.data_ptr()) && aligned16(a.data_ptr()) && aligned16(b.data_ptr());
    const int threads = 256;
    const int64_t work = vec ? (n * sizeof(scalar_t) + 15) / 16 : n;
    const int64_t max_blocks = at::cuda::getCurrentDeviceProperties()->multiProcessorCount * 8;
    const int blocks = static_cast<int>(std::max<int64_t>(1, std::min((work + threads - 1) / threads, max_blocks)));
    add_relu_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        out.data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), n, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
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
