// Launchers of conv_bias_act's kernels (igemm.cuh), instantiated once per dtype
// by conv_kernels_{f16,bf16,f32}.cu: the 20 kernels compile as three
// translation units, in parallel. Which kernel runs is decided by the host
// (conv_bias_act.cpp); these only launch it.
#pragma once

#include <climits>

#include "igemm.cuh"
#include "launch.h"

namespace resnet_fused {
namespace conv {

template <typename T, typename Cfg, bool kVec>
cudaError_t launch_tc(ConvKernel k, ConvParams p, int device, cudaStream_t stream) {
  p.n_tiles = static_cast<int>(ceil_div(p.Kg, Cfg::BN));
  const int smem = Cfg::SMEM_BYTES + (kVec ? 0 : Cfg::BM * 16);  // + per-row im2col table
  auto kernel = tc_conv_kernel<T, Cfg, kVec>;
  if (smem > 48 * 1024) {
    // Opting in to more than 48 KB of dynamic shared memory is per function and
    // device; done once (it is not a stream operation, so capture is unaffected).
    static PerDeviceFlag configured;
    if (!configured.test(device)) {
      const cudaError_t e =
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
      if (e != cudaSuccess) return e;
      configured.set(device);
    }
  }
  kernel<<<dim3(static_cast<unsigned>(grid_x(k, p)), p.groups), Cfg::THREADS, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_conv(ConvKernel k, ConvParams p, int device, cudaStream_t stream) {
  switch (k) {
    case ConvKernel::kTcL:
      return launch_tc<T, CfgL, true>(k, p, device, stream);
    case ConvKernel::kTcM:
      return launch_tc<T, CfgM, true>(k, p, device, stream);
    case ConvKernel::kTcS:
      return launch_tc<T, CfgS, true>(k, p, device, stream);
    case ConvKernel::kTcL2:
      return launch_tc<T, CfgL2, true>(k, p, device, stream);
    case ConvKernel::kTcX:
      return launch_tc<T, CfgX, false>(k, p, device, stream);
    case ConvKernel::kTcH:
      if constexpr (sizeof(T) == 2) return launch_tc<T, CfgH, true>(k, p, device, stream);
      return cudaErrorInvalidValue;  // no TF32 wgmma kernel: the host never picks H for fp32
    case ConvKernel::kSimt:
      p.n_tiles = static_cast<int>(ceil_div(p.Kg, tile_dims(k).bn));
      simt_conv_kernel<T><<<dim3(static_cast<unsigned>(grid_x(k, p)), p.groups), 256, 0, stream>>>(p);
      return cudaGetLastError();
    case ConvKernel::kDirect: {
      const int k_blocks = static_cast<int>(ceil_div(p.Kg, kDirectKPT));
      const int64_t total = int64_t{p.M} * p.groups * k_blocks;
      direct_conv_kernel<T><<<static_cast<unsigned>(grid_x(k, p)), kDirectThreads, 0, stream>>>(
          p, k_blocks, total);
      return cudaGetLastError();
    }
    case ConvKernel::kCutlass:
      return cudaErrorInvalidValue;  // launched by launch_cutlass
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t tc_ptx_version(int* version) {
  cudaFuncAttributes attr;
  const cudaError_t e = cudaFuncGetAttributes(&attr, tc_conv_kernel<T, CfgS, true>);
  if (e == cudaSuccess) *version = attr.ptxVersion;
  return e;
}

}  // namespace conv
}  // namespace resnet_fused

// The body of conv_kernels_<dtype>.cu.
#define RESNET_FUSED_CONV_KERNELS(T)                                                           \
  namespace resnet_fused {                                                                     \
  namespace conv {                                                                             \
  template cudaError_t launch_conv<T>(ConvKernel, ConvParams, int, cudaStream_t);              \
  template cudaError_t tc_ptx_version<T>(int*);                                                \
  }                                                                                            \
  }
