// Kernel of the CUDA add_relu ops: relu(a + b), memory bound. Dense tensors of one
// layout are treated as flat arrays and moved 16 bytes at a time, with a scalar
// tail. Host side (checks, layouts, grid size): add_relu.cpp.
#include "launch.h"

namespace resnet_fused {
namespace {

// The sum is computed in at::opmath_type's type (float for the 16-bit types), then
// rounded once to nearest.
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }

__device__ __forceinline__ void narrow(float v, __half& out) { out = __float2half_rn(v); }
__device__ __forceinline__ void narrow(float v, __nv_bfloat16& out) { out = __float2bfloat16_rn(v); }
__device__ __forceinline__ void narrow(float v, float& out) { out = v; }
__device__ __forceinline__ void narrow(double v, double& out) { out = v; }

template <typename T>
__device__ __forceinline__ T add_relu_one(T x, T y) {
  auto v = widen(x) + widen(y);
  using Acc = decltype(v);
  T out;
  narrow(v < Acc(0) ? Acc(0) : v, out);  // NaN passes, as in torch.relu
  return out;
}

// 16-byte aligned chunks in the grid-stride loop, then the remainder one by one.
// No __restrict__: the in-place variant passes out == a.
template <typename T>
__global__ void add_relu_kernel(T* out, const T* a, const T* b, int64_t n, bool vectorized) {
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

}  // namespace

template <typename T>
cudaError_t launch_add_relu(void* out, const void* a, const void* b, int64_t n, bool vectorized,
                            int blocks, int threads, cudaStream_t stream) {
  add_relu_kernel<T><<<blocks, threads, 0, stream>>>(static_cast<T*>(out), static_cast<const T*>(a),
                                                     static_cast<const T*>(b), n, vectorized);
  return cudaGetLastError();
}

template cudaError_t launch_add_relu<float>(void*, const void*, const void*, int64_t, bool, int, int,
                                            cudaStream_t);
template cudaError_t launch_add_relu<double>(void*, const void*, const void*, int64_t, bool, int, int,
                                             cudaStream_t);
template cudaError_t launch_add_relu<__half>(void*, const void*, const void*, int64_t, bool, int, int,
                                             cudaStream_t);
template cudaError_t launch_add_relu<__nv_bfloat16>(void*, const void*, const void*, int64_t, bool,
                                                    int, int, cudaStream_t);

}  // namespace resnet_fused
