// CUDA max_pool2d's kernel (no ATen): channels_last input, the maxima only. ATen's CUDA
// kernel also writes an int64 argmax per output element, 4x the bytes of an fp16 output,
// even when no gradient is wanted. One thread per output pixel and 16 bytes of channels
// where the channels and pointers allow, else per element; the max is taken in float,
// which is exact for every dtype here. NaN wins, as in torch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "launch.h"

namespace resnet_fused {
namespace {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// A NaN, once taken, stays: v > NaN is false.
__device__ __forceinline__ float max_nan(float m, float v) { return (v > m || v != v) ? v : m; }

template <typename T, bool kVec>
__global__ void max_pool_nhwc_kernel(const T* __restrict__ x, T* __restrict__ y, PoolParams p,
                                     int64_t total) {
  constexpr int V = kVec ? 16 / static_cast<int>(sizeof(T)) : 1;
  const int groups = p.C / V;  // V-channel groups per pixel
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int cg = static_cast<int>(i % groups);
    int64_t r = i / groups;
    const int ox = static_cast<int>(r % p.OW);
    r /= p.OW;
    const int oy = static_cast<int>(r % p.OH);
    const int64_t n = r / p.OH;
    float m[V];
#pragma unroll
    for (int v = 0; v < V; ++v) m[v] = -INFINITY;
    const int y0 = oy * p.sh - p.ph, x0 = ox * p.sw - p.pw;
    for (int dy = 0; dy < p.kh; ++dy) {
      const int iy = y0 + dy;
      if (static_cast<unsigned>(iy) >= static_cast<unsigned>(p.H)) continue;
      for (int dx = 0; dx < p.kw; ++dx) {
        const int ix = x0 + dx;
        if (static_cast<unsigned>(ix) >= static_cast<unsigned>(p.W)) continue;
        const T* src = x + ((n * p.H + iy) * p.W + ix) * p.C + static_cast<int64_t>(cg) * V;
        if constexpr (kVec) {
          const uint4 raw = *reinterpret_cast<const uint4*>(src);
          const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
          for (int v = 0; v < V; ++v) m[v] = max_nan(m[v], to_f(e[v]));
        } else {
          m[0] = max_nan(m[0], to_f(*src));
        }
      }
    }
    // Output element i * V is (n, oy, ox, cg * V) of the channels_last output.
    if constexpr (kVec) {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int v = 0; v < V; ++v) e[v] = from_f<T>(m[v]);
      *reinterpret_cast<uint4*>(y + i * V) = raw;
    } else {
      y[i] = from_f<T>(m[0]);
    }
  }
}

}  // namespace

template <typename T>
cudaError_t launch_max_pool(const void* x, void* y, const PoolParams& p, bool vectorized,
                            int max_blocks, cudaStream_t stream) {
  const int V = vectorized ? 16 / static_cast<int>(sizeof(T)) : 1;
  const int64_t total = p.N * p.OH * p.OW * (p.C / V);
  constexpr int kThreads = 256;
  const int blocks = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, max_blocks)));
  if (vectorized) {
    max_pool_nhwc_kernel<T, true><<<blocks, kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<T*>(y), p, total);
  } else {
    max_pool_nhwc_kernel<T, false><<<blocks, kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<T*>(y), p, total);
  }
  return cudaGetLastError();
}

template cudaError_t launch_max_pool<float>(const void*, void*, const PoolParams&, bool, int,
                                            cudaStream_t);
template cudaError_t launch_max_pool<__half>(const void*, void*, const PoolParams&, bool, int,
                                             cudaStream_t);
template cudaError_t launch_max_pool<__nv_bfloat16>(const void*, void*, const PoolParams&, bool,
                                                    int, cudaStream_t);

}  // namespace resnet_fused
