// What the host code of the CUDA ops (conv_bias_act.cpp, add_relu.cpp: C++ with
// ATen, compiled by the host compiler) and the kernel translation units
// (conv_kernels_*.cu, add_relu_kernels.cu: CUDA without ATen) share: kernel
// parameters, the table of conv kernels and the launchers.
//
// No torch header may be included here or in the .cu files: nvcc spends ~40 s
// of host passes on a translation unit that includes ATen, against a few seconds
// for the kernels themselves, so the kernels compile fast and in parallel only
// while ATen stays in the .cpp files.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <atomic>

namespace resnet_fused {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline bool aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// A flag per device (devices 0..63; beyond those nothing is remembered), for
// per-device work done once: a query, or a kernel attribute set.
class PerDeviceFlag {
 public:
  bool test(int device) const { return bit(device) != 0 && (bits_.load() & bit(device)) != 0; }
  void set(int device) { bits_.fetch_or(bit(device)); }

 private:
  static uint64_t bit(int device) {
    return device >= 0 && device < 64 ? uint64_t{1} << device : 0;
  }
  std::atomic<uint64_t> bits_{0};
};

namespace conv {

// Division by a run-time invariant divisor with one multiply-high and a shift
// (round-up method of Granlund & Montgomery). Exact for 0 <= n < 2^31 and
// 1 <= d < 2^31, which the host guarantees; integer division would cost ~20
// instructions per im2col coordinate.
struct FastDiv {
  uint32_t d = 1, mul = 1, shr = 0;
  FastDiv() = default;
  explicit FastDiv(uint32_t divisor) : d(divisor) {
    uint32_t l = 0;
    while ((uint64_t(1) << l) < d) ++l;
    mul = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << l) - d)) / d + 1);
    shr = l;
  }
  __host__ __device__ __forceinline__ int div(int n) const {
#ifdef __CUDA_ARCH__
    const uint32_t t = __umulhi(static_cast<uint32_t>(n), mul);
#else
    const uint32_t t = static_cast<uint32_t>((uint64_t(static_cast<uint32_t>(n)) * mul) >> 32);
#endif
    return static_cast<int>((t + static_cast<uint32_t>(n)) >> shr);
  }
};

struct ConvParams {
  const void* x;     // input, dense NHWC [N][H][W][C]
  const void* w;     // weight, dense KRSC [K][R][S][Cg]
  const void* bias;  // [K] in the input dtype, or null
  const void* res;   // residual, dense NHWC [N][P][Q][K], or null; may equal y
  void* y;           // output, dense NHWC [N][P][Q][K]
  int N, H, W, C;
  int P, Q, K;
  int R, S, Cg, Kg, groups;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int M, Kgemm;
  int n_tiles;   // CTA tiles along n, for the tile raster (set by the launcher)
  bool relu;
  bool pair_ok;  // two adjacent output channels may be stored as one aligned word
  FastDiv div_pq, div_q, div_cg, div_s;
};

// The kernels conv_bias_act launches (igemm.cuh):
//   kTcL, kTcM, kTcS  tensor cores, vector (cp.async) loads, CTA tiles 128x128, 128x64, 64x64
//   kTcX              tensor cores, scalar loads (any C, groups or alignment), 64x64
//   kTcH              Hopper wgmma (sm_90a builds, fp16/bf16, vector loads), 128x128
//   kTcL2             kTcL with each k-tile's MMAs issued before the next tile's loads
//                     (forced only, until measured: benchmarks/cuda_notes.md, finding 4)
//   kSimt             fp32 FMA, 64x64 (exact fp32, and every dtype without tensor cores)
//   kDirect           no GEMM tile: one thread per (pixel, group, kDirectKPT channels)
//   kCutlass          CUTLASS's Hopper GEMM (1x1 stride-1 convs) or implicit-GEMM conv
//                     (launch_cutlass / launch_cutlass_conv; forced only, until measured)
enum class ConvKernel { kTcL, kTcM, kTcS, kTcX, kTcH, kTcL2, kSimt, kDirect, kCutlass };

struct TileDims {
  int bm, bn;
};
// CTA tile of the GEMM kernels (igemm.cuh's TileCfg asserts it agrees).
constexpr TileDims tile_dims(ConvKernel k) {
  return k == ConvKernel::kTcL || k == ConvKernel::kTcH || k == ConvKernel::kTcL2
             ? TileDims{128, 128}
         : k == ConvKernel::kTcM ? TileDims{128, 64}
                                 : TileDims{64, 64};
}

constexpr int kDirectKPT = 8;  // output channels per thread of the direct kernel
constexpr int kDirectThreads = 256;
constexpr int64_t kMaxGridY = 65535;  // the GEMM kernels put the group on the grid's y

// CTAs along the grid's x for kernel k: the tile raster (M tiles x N tiles) of
// the GEMM kernels, or one thread per (pixel, group, channel block) of the direct one.
inline int64_t grid_x(ConvKernel k, const ConvParams& p) {
  if (k == ConvKernel::kDirect) {
    return ceil_div(int64_t{p.M} * p.groups * ceil_div(p.Kg, kDirectKPT), kDirectThreads);
  }
  const TileDims t = tile_dims(k);
  return ceil_div(p.M, t.bm) * ceil_div(p.Kg, t.bn);
}

// Launches kernel k for dtype T (float, __half, __nv_bfloat16) on `stream`, on
// the current device `device`; returns the launch's error. The host has checked
// grid_x(k, p) <= INT_MAX and, for the GEMM kernels, p.groups <= kMaxGridY.
// One translation unit per dtype (conv_kernels_*.cu) instantiates it.
template <typename T>
cudaError_t launch_conv(ConvKernel k, ConvParams p, int device, cudaStream_t stream);

// The virtual arch (cudaFuncAttributes::ptxVersion, e.g. 90 for compute_90) that
// the current device's code of the tensor-core kernels for T was compiled for.
// Below 80 that code is the kernel's __trap() stub: a build whose only code for
// this GPU is PTX older than sm_80, JIT-compiled by the driver.
template <typename T>
cudaError_t tc_ptx_version(int* version);

// CUTLASS's Hopper kernels for convs with a bias and the ReLU, fp16/bf16, in a build
// with them (setup.py: 9.0a among the archs and CUTLASS's headers found; elsewhere
// the host never calls them). The host checks the conv, alignment (16 bytes) and GPU
// (sm_90) first, and passes a workspace of the *_workspace_bytes they ask for. Each
// returns null, or CUTLASS's reason.
#if defined(RESNET_FUSED_CUTLASS) && defined(RESNET_FUSED_SM90A)
constexpr bool kCutlassBuilt = true;
#else
constexpr bool kCutlassBuilt = false;
#endif
// 1x1 stride-1 convs as one GEMM (cutlass_gemm1x1_sm90.cu); C and K multiples of 8.
template <typename T>
size_t cutlass_workspace_bytes(const ConvParams& p);
template <typename T>
const char* launch_cutlass(const ConvParams& p, void* workspace, cudaStream_t stream);
// The others (any R x S, stride, padding, dilation; one group; C a multiple of 64) on
// the implicit-GEMM convolution (cutlass_conv_sm90.cu).
template <typename T>
size_t cutlass_conv_workspace_bytes(const ConvParams& p);
template <typename T>
const char* launch_cutlass_conv(const ConvParams& p, void* workspace, cudaStream_t stream);

}  // namespace conv

// relu(a + b) over n elements of dtype T (float, double, __half, __nv_bfloat16)
// on `stream` (add_relu_kernels.cu); out may be a. vectorized: out, a and b are
// 16-byte aligned. Returns the launch's error.
template <typename T>
cudaError_t launch_add_relu(void* out, const void* a, const void* b, int64_t n, bool vectorized,
                            int blocks, int threads, cudaStream_t stream);

// max_pool2d over a channels_last [N, H, W, C] input into a [N, OH, OW, C] output.
struct PoolParams {
  int64_t N;
  int C, H, W, OH, OW, kh, kw, sh, sw, ph, pw;
};

// The maxima of each window, for dtype T (float, __half, __nv_bfloat16), on `stream`
// (max_pool_kernels.cu), in at most max_blocks blocks. vectorized: C is a multiple of
// 16 / sizeof(T) and both pointers are 16-byte aligned. Returns the launch's error.
template <typename T>
cudaError_t launch_max_pool(const void* x, void* y, const PoolParams& p, bool vectorized,
                            int max_blocks, cudaStream_t stream);

}  // namespace resnet_fused
