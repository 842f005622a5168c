// CUDA max_pool2d: checks, layout and the launch (host code; the kernel is in
// max_pool_kernels.cu). The maxima only, without the argmax ATen writes alongside.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>
#include <vector>

#include "checks.h"
#include "launch.h"

namespace resnet_fused {
namespace {

using at::Tensor;

Tensor max_pool2d_cuda(const Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                       at::IntArrayRef padding) {
  const auto dims = check_max_pool2d_args(input, kernel_size, stride, padding, /*half=*/true);
  TORCH_CHECK(input.is_cuda(), "max_pool2d (CUDA kernel): expected input on a CUDA device, got ",
              input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  const auto fmt = output_memory_format(input);
  const std::vector<int64_t> size{input.size(0), input.size(1), dims[0], dims[1]};
  // Empty: ATen's layout (.contiguous() below would not restride an empty tensor).
  if (c10::multiply_integers(size) == 0) return at::empty(size, input.options().memory_format(fmt));
  const Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  Tensor out = at::empty(size, input.options().memory_format(at::MemoryFormat::ChannelsLast));
  {
    TORCH_CHECK(input.size(1) <= INT_MAX && input.size(2) <= INT_MAX && input.size(3) <= INT_MAX,
                "max_pool2d (CUDA kernel): sizes too large for 32-bit coordinates, input ",
                input.sizes());
    for (size_t d = 0; d < 2; ++d) {
      TORCH_CHECK(kernel_size[d] <= INT_MAX && stride[d] <= INT_MAX, "max_pool2d (CUDA kernel): "
                  "expected kernel_size and stride below 2^31, got kernel_size ", kernel_size,
                  " and stride ", stride);
    }
    const PoolParams p{input.size(0),
                       static_cast<int>(input.size(1)),
                       static_cast<int>(input.size(2)),
                       static_cast<int>(input.size(3)),
                       static_cast<int>(dims[0]),
                       static_cast<int>(dims[1]),
                       static_cast<int>(kernel_size[0]),
                       static_cast<int>(kernel_size[1]),
                       static_cast<int>(stride[0]),
                       static_cast<int>(stride[1]),
                       static_cast<int>(padding[0]),
                       static_cast<int>(padding[1])};
    const bool vec = p.C % (16 / x.element_size()) == 0 && aligned(x.const_data_ptr(), 16) &&
                     aligned(out.data_ptr(), 16);
    const int max_blocks = at::cuda::getCurrentDeviceProperties()->multiProcessorCount * 16;
    const auto stream = at::cuda::getCurrentCUDAStream().stream();
    cudaError_t e = cudaSuccess;
    switch (x.scalar_type()) {
      case at::kFloat:
        e = launch_max_pool<float>(x.const_data_ptr(), out.data_ptr(), p, vec, max_blocks, stream);
        break;
      case at::kHalf:
        e = launch_max_pool<__half>(x.const_data_ptr(), out.data_ptr(), p, vec, max_blocks, stream);
        break;
      default:
        e = launch_max_pool<__nv_bfloat16>(x.const_data_ptr(), out.data_ptr(), p, vec, max_blocks,
                                           stream);
    }
    C10_CUDA_CHECK(e);
  }
  return out.contiguous(fmt);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) { m.impl("max_pool2d", &max_pool2d_cuda); }

}  // namespace resnet_fused
