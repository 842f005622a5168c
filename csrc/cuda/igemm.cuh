// Device code of conv_bias_act: implicit-GEMM convolution kernels over NHWC
// activations and KRSC weights, with the bias / residual / ReLU epilogue applied
// to the accumulators in registers. Launchers: conv_launch.cuh; which kernel
// runs: conv_bias_act.cpp; parameters and the kernel table: launch.h.
//
// GEMM view, per group g:  Y[m, n] = sum_k A[m, k] * B[n, k]
//   m = (image, p, q) output pixel        M = N*P*Q
//   n = output channel within the group   Kg = K / groups
//   k = (r, s, c) filter tap and channel  Kgemm = R*S*Cg  (c fastest, as in KRSC)
// A is never materialised: each tile is gathered from the input (implicit im2col),
// with zeros for padding and for rows/columns past the end of the GEMM.
#pragma once

#include <type_traits>

#include "launch.h"

namespace resnet_fused {
namespace conv {

// ---------------------------------------------------------------------------
// Element types: fp32 math on both sides of a conversion, round to nearest.
template <typename T>
struct Num;
template <>
struct Num<float> {
  using Pair = float2;
  static __device__ __forceinline__ float to_f(float v) { return v; }
  static __device__ __forceinline__ float from_f(float v) { return v; }
  static __device__ __forceinline__ float2 to_f2(Pair v) { return v; }
  static __device__ __forceinline__ Pair from_f2(float a, float b) { return make_float2(a, b); }
};
template <>
struct Num<__half> {
  using Pair = __half2;
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ float2 to_f2(Pair v) { return __half22float2(v); }
  static __device__ __forceinline__ Pair from_f2(float a, float b) { return __floats2half2_rn(a, b); }
};
template <>
struct Num<__nv_bfloat16> {
  using Pair = __nv_bfloat162;
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ float2 to_f2(Pair v) { return __bfloat1622float2(v); }
  static __device__ __forceinline__ Pair from_f2(float a, float b) { return __floats2bfloat162_rn(a, b); }
};

// torch.relu semantics: NaN passes through (fmaxf would turn it into 0).
__device__ __forceinline__ float relu_nan(float v) { return v < 0.f ? 0.f : v; }

// y[m, g*Kg + n] = act(v + bias [+ res]) for one element; n < Kg checked by the caller.
template <typename T>
__device__ __forceinline__ void store_one(const ConvParams& p, int64_t off, int gk, float v) {
  if (p.bias != nullptr) v += Num<T>::to_f(static_cast<const T*>(p.bias)[gk]);
  if (p.res != nullptr) v += Num<T>::to_f(static_cast<const T*>(p.res)[off]);
  if (p.relu) v = relu_nan(v);
  static_cast<T*>(p.y)[off] = Num<T>::from_f(v);
}

// ---------------------------------------------------------------------------
// PTX wrappers (sm_80+).
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy that bypasses L1; src_bytes = 0 writes zeros
// (padding and out-of-range rows cost no global traffic).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

// One warp-level MMA step that consumes 32 bytes of K per row of A and B:
// m16n8k16 for 16-bit types, m16n8k8 for TF32. Fragments come from ldmatrix on
// K-contiguous tiles; for 32-bit elements an 8x8 b16 matrix is an 8x4 matrix of
// words, and lane i then holds (row i/4, word i%4), which is exactly the TF32
// fragment layout, so one addressing scheme serves all three types.
template <typename T>
struct Mma;
template <>
struct Mma<__half> {
  static __device__ __forceinline__ void prep(uint32_t&) {}
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
  }
};
template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void prep(uint32_t&) {}
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
  }
};
template <>
struct Mma<float> {
  // Round fp32 to TF32 to nearest, as cuDNN does; the tensor core alone would
  // truncate the low mantissa bits, a bias toward zero.
  static __device__ __forceinline__ void prep(uint32_t& v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(v) : "r"(v));
#endif
  }
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
  }
};

// ---------------------------------------------------------------------------
// Hopper warpgroup MMA (wgmma, sm_90a only: elsewhere these compile to nothing
// and the kernel that uses them to a trap the host never reaches).
//
// A and B come straight from shared memory through 64-bit matrix descriptors.
// The tiles above are already in wgmma's K-major 64-byte-swizzle layout: rows of
// 64 bytes, 16-byte chunk c of row r at chunk c ^ ((r >> 1) & 3), which is the
// hardware's Swizzle<2,4,3> when the tile starts on a 512-byte boundary. So a
// descriptor needs: the start address, the stride between 8-row groups (8 rows x
// 64 bytes = 512), the leading offset (unused by swizzled K-major layouts,
// encoded as 1) and the swizzle mode (2 = 64 bytes). The second k-step of a stage
// starts 32 bytes into each row; the swizzle applies to the absolute address, so
// moving the start address is enough (the pattern's base stays 512-aligned).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define RESNET_FUSED_WGMMA 1
#endif

__device__ __forceinline__ uint64_t wgmma_desc_sw64(uint32_t smem_addr) {
  return static_cast<uint64_t>((smem_addr & 0x3FFFF) >> 4) | (uint64_t{1} << 16) |
         (uint64_t{512 >> 4} << 32) | (uint64_t{2} << 62);
}
__device__ __forceinline__ void wgmma_fence() {
#ifdef RESNET_FUSED_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifdef RESNET_FUSED_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#ifdef RESNET_FUSED_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Shared memory written by ordinary (generic-proxy) stores, cp.async included,
// must be fenced by each writing thread before wgmma (the async proxy) reads it.
__device__ __forceinline__ void fence_proxy_async_shared() {
#ifdef RESNET_FUSED_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// Pins the accumulators in order around the asynchronous MMAs: the compiler sees
// each register read and written here, so it can neither read one early (before
// wgmma.wait_group) nor move it between an MMA's issue and its wait.
template <int NI>
__device__ __forceinline__ void wgmma_fence_operands(float (&d)[NI][4]) {
#pragma unroll
  for (int i = 0; i < NI; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[i][e])::"memory");
}

// D[64 x 128] += A[64 x 16] * B[128 x 16]^T, fp32 accumulators, per warpgroup.
// d[j][e] follows mma.sync's m16n8 accumulator layout within each warp's 16 rows:
// j is the 8-column block, e = 0,1 row lane/4 and e = 2,3 row lane/4 + 8, columns
// 2*(lane%4) + e%2.
#define RESNET_FUSED_WGMMA_M64N128K16(TYPE)                                             \
  asm volatile(                                                                        \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                     \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " {"                \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"         \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"\
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"\
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63},"\
      " %64, %65, p, 1, 1, 0, 0;\n}\n"                                                 \
      :                                                                                \
        "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),                   \
        "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),                   \
        "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),                   \
        "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),                   \
        "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),                   \
        "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),                   \
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),                   \
        "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),                   \
        "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),                   \
        "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),                   \
        "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]),               \
        "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),               \
        "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]),               \
        "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),               \
        "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),               \
        "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])                \
      : "l"(desc_a), "l"(desc_b), "r"(1))

template <typename T>
struct Wgmma;
template <>
struct Wgmma<__half> {
  static __device__ __forceinline__ void run(float (&d)[16][4], uint64_t desc_a, uint64_t desc_b) {
#ifdef RESNET_FUSED_WGMMA
    RESNET_FUSED_WGMMA_M64N128K16("f16");
#endif
  }
};
template <>
struct Wgmma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[16][4], uint64_t desc_a, uint64_t desc_b) {
#ifdef RESNET_FUSED_WGMMA
    RESNET_FUSED_WGMMA_M64N128K16("bf16");
#endif
  }
};
#undef RESNET_FUSED_WGMMA_M64N128K16

// ---------------------------------------------------------------------------
// Tensor-core kernel.
//
// Shared memory per stage: A tile BM rows x 64 bytes, B tile BN rows x 64 bytes,
// both K-contiguous (32 fp16/bf16 or 16 fp32 values of GEMM-K per row), so one
// stage is two MMA k-steps for every type. A row is four 16-byte chunks; chunk c
// of row r is stored at chunk c ^ ((r >> 1) & 3): the 8 rows one ldmatrix phase
// reads (and the rows one cp.async instruction writes) then fall in 8 distinct
// 16-byte bank groups, with no padding.
template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_, int MIN_BLOCKS_,
          bool WGMMA_ = false, bool MMA_FIRST_ = false>
struct TileCfg {
  static constexpr int BM = BM_, BN = BN_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
  static constexpr int STAGES = STAGES_, MIN_BLOCKS = MIN_BLOCKS_;
  static constexpr bool WGMMA = WGMMA_;
  // Each k-tile's MMAs issued before the next k-tile's loads (vector path).
  static constexpr bool MMA_FIRST = MMA_FIRST_;
  static constexpr int THREADS = WARPS_M * WARPS_N * 32;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // warp tile
  static constexpr int MI = WM / 16, NI = WN / 8;              // MMA tiles per warp
  static constexpr int ROW_BYTES = 64;
  static constexpr int SMEM_BYTES = STAGES * (BM + BN) * ROW_BYTES;
  static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tile must be a multiple of 16x16");
  static_assert((BM * 4) % THREADS == 0 && (BN * 4) % THREADS == 0, "chunks must split evenly");
  // wgmma: each warpgroup (4 warps) one m64n128 MMA; warp w of it owns 16 rows.
  static_assert(!WGMMA || (WARPS_N == 1 && WM == 16 && BN == 128 && STAGES >= 3),
                "wgmma tiles: warpgroups stacked along M, 64 x 128 each");
};

// Tile table (chosen per shape in conv_bias_act.cpp):
//   L 128x128, 8 warps of 64x32: big GEMMs with >64 output channels; 64 KB smem, 2 CTAs/SM.
//   M 128x64,  4 warps of 64x32: the 64-channel layers, where a 128-wide tile would be half empty.
//   S 64x64,   4 warps of 32x32: small GEMMs (few tiles: small batch, 7x7 maps). 4 stages everywhere: cp.async latency is ~3 k-tiles of MMA.
//   X 64x64 for the scalar-load path: its 2x16 in-flight elements per thread need a
//              looser register cap than S (which would spill).
//   H 128x128 on Hopper (sm_90a, fp16/bf16): two warpgroups of wgmma m64n128k16 on the
//              same shared-memory tiles and loads as L; 5 stages, 3 k-tiles in flight
//              (a stage is refilled only once the MMAs that read it have retired). 2 CTAs
//              per SM: at 167 registers only one fitted, and nothing filled its barrier and
//              epilogue gaps; capped at 128, ptxas (CUDA 13.0) spills 216 bytes, all after
//              the main loop. Not yet measured (benchmarks/cuda_notes.md, finding 1).
using CfgL = TileCfg<128, 128, 2, 4, 4, 2>;
using CfgM = TileCfg<128, 64, 2, 2, 4, 3>;
using CfgS = TileCfg<64, 64, 2, 2, 4, 4>;
using CfgX = TileCfg<64, 64, 2, 2, 4, 3>;
using CfgH = TileCfg<128, 128, 8, 1, 5, 2, true>;
//   L2 L with the MMAs of each k-tile issued before the loads of k-tile kt+3, whose
//              ~140 instructions of im2col address math per warp (and cp.async, which
//              ldmatrix may not pass) otherwise sit between every barrier and the first
//              MMA. Forced only, until measured (benchmarks/cuda_notes.md, finding 4).
using CfgL2 = TileCfg<128, 128, 2, 4, 4, 2, false, true>;

template <typename Cfg>
constexpr bool same_tile(ConvKernel k) {
  return Cfg::BM == tile_dims(k).bm && Cfg::BN == tile_dims(k).bn;
}
static_assert(same_tile<CfgL>(ConvKernel::kTcL) && same_tile<CfgM>(ConvKernel::kTcM) &&
                  same_tile<CfgS>(ConvKernel::kTcS) && same_tile<CfgX>(ConvKernel::kTcX) &&
                  same_tile<CfgH>(ConvKernel::kTcH) && same_tile<CfgL2>(ConvKernel::kTcL2),
              "launch.h's tile_dims must match the tile configs");

__device__ __forceinline__ uint32_t swz(int row, int chunk) {
  return static_cast<uint32_t>(row * 64 + ((chunk ^ ((row >> 1) & 3)) << 4));
}

// kVec: every 16-byte chunk of a row of A or B is 16 contiguous, aligned bytes
// in global memory (Cg and C multiples of 16/sizeof(T), aligned base pointers),
// loaded with cp.async. Otherwise (the C=3 stem, small grouped convs, misaligned
// views) elements are gathered one by one through registers: slower, correct.
template <typename T, typename Cfg, bool kVec>
__global__ void __launch_bounds__(Cfg::THREADS, Cfg::MIN_BLOCKS) tc_conv_kernel(const ConvParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#ifndef RESNET_FUSED_WGMMA
  if constexpr (Cfg::WGMMA) {
    __trap();  // wgmma code exists only for sm_90a; the host launches it only there
  } else
#endif
  {
  static_assert(!Cfg::WGMMA || (kVec && sizeof(T) == 2), "wgmma: fp16/bf16 with vector loads");
  constexpr int BM = Cfg::BM, BN = Cfg::BN, STAGES = Cfg::STAGES, THREADS = Cfg::THREADS;
  constexpr int MI = Cfg::MI, NI = Cfg::NI;
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));  // elements per chunk
  constexpr int BK = 64 / static_cast<int>(sizeof(T));   // GEMM-K elements per stage
  constexpr uint32_t A_STAGE = BM * 64, B_STAGE = BN * 64;
  using Bits = typename std::conditional<sizeof(T) == 2, uint16_t, uint32_t>::type;

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sA = smem_u32(smem);
  const uint32_t sB = sA + STAGES * A_STAGE;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / Cfg::WARPS_N, warp_n = warp % Cfg::WARPS_N;
  // n tiles vary fastest: CTAs running together share an A tile (the big
  // activation) in L2 and read the small weight from L2 anyway.
  const int tile_n = static_cast<int>(blockIdx.x % static_cast<unsigned>(p.n_tiles));
  const int tile_m = static_cast<int>(blockIdx.x / static_cast<unsigned>(p.n_tiles));
  const int g = blockIdx.y;
  const int m0 = tile_m * BM, n0 = tile_n * BN;
  const int KT = (p.Kgemm + BK - 1) / BK;

  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ wt = static_cast<const T*>(p.w);
  const int64_t img_stride = static_cast<int64_t>(p.H) * p.W * p.C;
  const int64_t w_group = static_cast<int64_t>(g) * p.Kg;  // first weight row of the group

  // ---- loader state -------------------------------------------------------
  // kVec: thread owns chunk column (tid & 3) of rows (tid >> 2) + i * THREADS/4.
  constexpr int A_IT = BM * 4 / THREADS, B_IT = BN * 4 / THREADS, ROW_STEP_V = THREADS / 4;
  // scalar: thread owns element column (tid % BK) of rows tid / BK + j * THREADS/BK.
  constexpr int ROW_STEP_S = THREADS / BK;
  constexpr int A_SIT = kVec ? 1 : BM / ROW_STEP_S, B_SIT = kVec ? 1 : BN / ROW_STEP_S;
  static_assert(kVec || (THREADS % BK == 0 && BM % ROW_STEP_S == 0 && BN % ROW_STEP_S == 0), "");

  // Output pixel -> (image offset, top-left input row/col) of each A row. A row
  // past M gets an h0 so negative that every tap reads as padding.
  auto decode_row = [&](int m, int64_t& base, int& h0, int& w0) {
    if (m < p.M) {
      const int img = p.div_pq.div(m);
      const int pq = m - img * (p.P * p.Q);
      const int pp = p.div_q.div(pq);
      const int qq = pq - pp * p.Q;
      base = img * img_stride + static_cast<int64_t>(g) * p.Cg;
      h0 = pp * p.stride_h - p.pad_h;
      w0 = qq * p.stride_w - p.pad_w;
    } else {
      base = 0;
      h0 = -(1 << 30);
      w0 = 0;
    }
  };
  // GEMM-K index -> (filter row offset, filter col offset, channel).
  auto decode_k = [&](int k, int& dh, int& dw, int& c) {
    const int rs = p.div_cg.div(k);
    c = k - rs * p.Cg;
    const int r = p.div_s.div(rs);
    dh = r * p.dil_h;
    dw = (rs - r * p.S) * p.dil_w;
  };

  int64_t a_base[kVec ? A_IT : 1];
  int a_h0[kVec ? A_IT : 1], a_w0[kVec ? A_IT : 1];
  int64_t* s_base = nullptr;  // scalar path: per-row tables in shared memory
  int* s_h0 = nullptr;
  int* s_w0 = nullptr;
  if constexpr (kVec) {
#pragma unroll
    for (int i = 0; i < A_IT; ++i) decode_row(m0 + (tid >> 2) + i * ROW_STEP_V, a_base[i], a_h0[i], a_w0[i]);
  } else {
    s_base = reinterpret_cast<int64_t*>(smem + STAGES * (A_STAGE + B_STAGE));
    s_h0 = reinterpret_cast<int*>(s_base + BM);
    s_w0 = s_h0 + BM;
    for (int row = tid; row < BM; row += THREADS) decode_row(m0 + row, s_base[row], s_h0[row], s_w0[row]);
    __syncthreads();
  }

  auto load_vec = [&](int slot, int kt) {
    const int chunk = tid & 3;
    const int k = kt * BK + chunk * VEC;
    const bool kvalid = k < p.Kgemm;
    int dh, dw, c;
    decode_k(k, dh, dw, c);
#pragma unroll
    for (int i = 0; i < A_IT; ++i) {
      const int row = (tid >> 2) + i * ROW_STEP_V;
      const int h = a_h0[i] + dh, w = a_w0[i] + dw;
      const bool ok = kvalid && static_cast<unsigned>(h) < static_cast<unsigned>(p.H) &&
                      static_cast<unsigned>(w) < static_cast<unsigned>(p.W);
      const T* src = ok ? x + a_base[i] + (static_cast<int64_t>(h) * p.W + w) * p.C + c : x;
      cp_async16(sA + slot * A_STAGE + swz(row, chunk), src, ok);
    }
#pragma unroll
    for (int i = 0; i < B_IT; ++i) {
      const int row = (tid >> 2) + i * ROW_STEP_V;
      const bool ok = kvalid && n0 + row < p.Kg;
      const T* src = ok ? wt + (w_group + n0 + row) * p.Kgemm + k : wt;
      cp_async16(sB + slot * B_STAGE + swz(row, chunk), src, ok);
    }
  };

  Bits a_reg[A_SIT], b_reg[B_SIT];
  auto fetch_scalar = [&](int kt) {
    const Bits* xb = reinterpret_cast<const Bits*>(x);
    const Bits* wb = reinterpret_cast<const Bits*>(wt);
    const int k = kt * BK + tid % BK;
    const bool kvalid = k < p.Kgemm;
    int dh, dw, c;
    decode_k(k, dh, dw, c);
#pragma unroll
    for (int j = 0; j < A_SIT; ++j) {
      const int row = tid / BK + j * ROW_STEP_S;
      const int h = s_h0[row] + dh, w = s_w0[row] + dw;
      const bool ok = kvalid && static_cast<unsigned>(h) < static_cast<unsigned>(p.H) &&
                      static_cast<unsigned>(w) < static_cast<unsigned>(p.W);
      a_reg[j] = ok ? xb[s_base[row] + (static_cast<int64_t>(h) * p.W + w) * p.C + c] : Bits(0);
    }
#pragma unroll
    for (int j = 0; j < B_SIT; ++j) {
      const int row = tid / BK + j * ROW_STEP_S;
      const bool ok = kvalid && n0 + row < p.Kg;
      b_reg[j] = ok ? wb[(w_group + n0 + row) * p.Kgemm + k] : Bits(0);
    }
  };
  auto put_scalar = [&](int slot) {
    const int byte = (tid % BK) * static_cast<int>(sizeof(T));
    const int chunk = byte >> 4, within = byte & 15;
#pragma unroll
    for (int j = 0; j < A_SIT; ++j) {
      const int row = tid / BK + j * ROW_STEP_S;
      *reinterpret_cast<Bits*>(smem + slot * A_STAGE + swz(row, chunk) + within) = a_reg[j];
    }
#pragma unroll
    for (int j = 0; j < B_SIT; ++j) {
      const int row = tid / BK + j * ROW_STEP_S;
      *reinterpret_cast<Bits*>(smem + STAGES * A_STAGE + slot * B_STAGE + swz(row, chunk) + within) = b_reg[j];
    }
  };

  // ---- MMA ----------------------------------------------------------------
  float acc[MI][NI][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;

  // ldmatrix lane addressing. A (x4 = 16 rows x 2 chunks): lane -> row lane&15,
  // chunk lane>>4, giving a0..a3 in MMA order. B (x4 = two n8 tiles x 2 chunks):
  // lane -> row (lane&7) + 8*(lane>>4), chunk (lane>>3)&1. Tile bases are
  // multiples of 16 rows, so the swizzle term depends on the lane only.
  const int a_row = warp_m * Cfg::WM + (lane & 15);
  const int b_row = warp_n * Cfg::WN + (lane & 7) + ((lane >> 4) << 3);
  const int a_sel = lane >> 4, b_sel = (lane >> 3) & 1;

  auto compute = [&](int slot) {
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      uint32_t af[MI][4], bfr[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
        ldmatrix_x4(af[mi], sA + slot * A_STAGE + swz(a_row + mi * 16, ks * 2 + a_sel));
#pragma unroll
      for (int nj = 0; nj < NI / 2; ++nj) {
        uint32_t t[4];
        ldmatrix_x4(t, sB + slot * B_STAGE + swz(b_row + nj * 16, ks * 2 + b_sel));
        bfr[2 * nj][0] = t[0];
        bfr[2 * nj][1] = t[1];
        bfr[2 * nj + 1][0] = t[2];
        bfr[2 * nj + 1][1] = t[3];
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int e = 0; e < 4; ++e) Mma<T>::prep(af[mi][e]);
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        Mma<T>::prep(bfr[ni][0]);
        Mma<T>::prep(bfr[ni][1]);
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) Mma<T>::run(acc[mi][ni], af[mi], bfr[ni]);
    }
  };

  // ---- pipeline -----------------------------------------------------------
  if constexpr (Cfg::WGMMA) {
    // The MMAs of k-tile kt are still running when iteration kt+1 starts, so the
    // slot refilled in iteration kt is that of k-tile kt-2, retired by the
    // wgmma.wait_group(1) every warpgroup passed in iteration kt-1, before the
    // barrier: AHEAD = STAGES - 2 k-tiles of loads in flight.
    constexpr int AHEAD = STAGES - 2;
    if (sA % 512 != 0) __trap();  // the descriptors assume 512-byte aligned tiles
    const uint32_t a_rows = static_cast<uint32_t>(warp / 4) * 64 * 64;  // this warpgroup's 64 rows
#pragma unroll
    for (int s = 0; s < AHEAD; ++s) {
      if (s < KT) load_vec(s, s);
      cp_async_commit();
    }
    for (int kt = 0; kt < KT; ++kt) {
      cp_async_wait<AHEAD - 1>();
      fence_proxy_async_shared();
      __syncthreads();
      const int pf = kt + AHEAD;
      if (pf < KT) load_vec(pf % STAGES, pf);
      cp_async_commit();
      const uint32_t a = sA + (kt % STAGES) * A_STAGE + a_rows;
      const uint32_t b = sB + (kt % STAGES) * B_STAGE;
      wgmma_fence_operands(acc[0]);
      wgmma_fence();
      Wgmma<T>::run(acc[0], wgmma_desc_sw64(a), wgmma_desc_sw64(b));
      Wgmma<T>::run(acc[0], wgmma_desc_sw64(a + 32), wgmma_desc_sw64(b + 32));
      wgmma_commit();
      wgmma_wait<1>();
      wgmma_fence_operands(acc[0]);
    }
    wgmma_wait<0>();
    wgmma_fence_operands(acc[0]);
  } else {
  // One barrier per k-tile: the slot refilled in iteration kt is the one every
  // thread finished reading in iteration kt-1, before that barrier.
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KT) {
      if constexpr (kVec) {
        load_vec(s, s);
      } else {
        fetch_scalar(s);
        put_scalar(s);
      }
    }
    cp_async_commit();  // committed even when empty: keeps the group count per k-tile fixed
  }
  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int pf = kt + STAGES - 1;
    if constexpr (kVec && Cfg::MMA_FIRST) {
      // The slot refilled here, (kt - 1) % STAGES, is not the one computed on: every
      // thread finished reading it before this iteration's barrier. Tile kt + 1 still
      // has STAGES - 2 iterations of loads ahead of it.
      compute(kt % STAGES);
      if (pf < KT) load_vec(pf % STAGES, pf);
      cp_async_commit();
    } else if constexpr (kVec) {
      if (pf < KT) load_vec(pf % STAGES, pf);
      cp_async_commit();
      compute(kt % STAGES);
    } else {
      // Global loads issued before the MMAs of this k-tile, stored after them,
      // so their latency overlaps the math.
      if (pf < KT) fetch_scalar(pf);
      compute(kt % STAGES);
      if (pf < KT) put_scalar(pf % STAGES);
    }
  }
  }
  cp_async_wait<0>();

  // ---- epilogue: accumulators -> bias, residual, ReLU -> one store ----------
  using Pair = typename Num<T>::Pair;
  const T* bias = static_cast<const T*>(p.bias);
  const int col_base = n0 + warp_n * Cfg::WN + (lane & 3) * 2;
  const int row_base = m0 + warp_m * Cfg::WM + (lane >> 2);
  float b0[NI], b1[NI];
#pragma unroll
  for (int ni = 0; ni < NI; ++ni) {
    const int col = col_base + ni * 8;
    const int gk = g * p.Kg + col;
    b0[ni] = (bias != nullptr && col < p.Kg) ? Num<T>::to_f(bias[gk]) : 0.f;
    b1[ni] = (bias != nullptr && col + 1 < p.Kg) ? Num<T>::to_f(bias[gk + 1]) : 0.f;
  }
  T* y = static_cast<T*>(p.y);
  const T* res = static_cast<const T*>(p.res);  // may alias y: read before write, same thread
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int m = row_base + mi * 16 + half * 8;
      if (m >= p.M) continue;
      const int64_t row_off = static_cast<int64_t>(m) * p.K + static_cast<int64_t>(g) * p.Kg;
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const int col = col_base + ni * 8;
        if (col >= p.Kg) continue;
        float v0 = acc[mi][ni][half * 2] + b0[ni];
        float v1 = acc[mi][ni][half * 2 + 1] + b1[ni];
        const int64_t off = row_off + col;
        if (p.pair_ok) {  // Kg even, so col + 1 < Kg as well
          if (res != nullptr) {
            const float2 r = Num<T>::to_f2(*reinterpret_cast<const Pair*>(res + off));
            v0 += r.x;
            v1 += r.y;
          }
          if (p.relu) {
            v0 = relu_nan(v0);
            v1 = relu_nan(v1);
          }
          *reinterpret_cast<Pair*>(y + off) = Num<T>::from_f2(v0, v1);
        } else {
          if (res != nullptr) v0 += Num<T>::to_f(res[off]);
          if (p.relu) v0 = relu_nan(v0);
          y[off] = Num<T>::from_f(v0);
          if (col + 1 < p.Kg) {
            if (res != nullptr) v1 += Num<T>::to_f(res[off + 1]);
            if (p.relu) v1 = relu_nan(v1);
            y[off + 1] = Num<T>::from_f(v1);
          }
        }
      }
    }
  }
  }
#else
  __trap();  // the host never launches this below sm_80
#endif
}

// ---------------------------------------------------------------------------
// Exact fp32 path (and the fallback below sm_80): a 64x64x16 SIMT tile, each
// thread a 4x4 block of outputs, fp32 FMA. Operands are gathered element by
// element, so any C, groups or alignment works.
template <typename T>
__global__ void __launch_bounds__(256) simt_conv_kernel(const ConvParams p) {
  constexpr int BM = tile_dims(ConvKernel::kSimt).bm, BN = tile_dims(ConvKernel::kSimt).bn;
  static_assert(BM == 64 && BN == 64, "the thread mapping below assumes a 64x64 tile");
  constexpr int BK = 16, PAD = 4;  // PAD keeps float4 rows aligned
  __shared__ __align__(16) float As[BK][BM + PAD];
  __shared__ __align__(16) float Bs[BK][BN + PAD];

  const int tid = threadIdx.x;
  const int tile_n = static_cast<int>(blockIdx.x % static_cast<unsigned>(p.n_tiles));
  const int tile_m = static_cast<int>(blockIdx.x / static_cast<unsigned>(p.n_tiles));
  const int g = blockIdx.y;
  const int m0 = tile_m * BM, n0 = tile_n * BN;
  const int KT = (p.Kgemm + BK - 1) / BK;
  const T* x = static_cast<const T*>(p.x);
  const T* wt = static_cast<const T*>(p.w);
  const int64_t img_stride = static_cast<int64_t>(p.H) * p.W * p.C;

  // Loads: thread owns GEMM-K column tid % 16 (consecutive threads read
  // consecutive channels) of rows tid / 16 + 16 j.
  const int lk = tid % BK, lrow = tid / BK;
  int64_t base[4];
  int h0[4], w0[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int m = m0 + lrow + 16 * j;
    if (m < p.M) {
      const int img = p.div_pq.div(m);
      const int pq = m - img * (p.P * p.Q);
      const int pp = p.div_q.div(pq);
      const int qq = pq - pp * p.Q;
      base[j] = img * img_stride + static_cast<int64_t>(g) * p.Cg;
      h0[j] = pp * p.stride_h - p.pad_h;
      w0[j] = qq * p.stride_w - p.pad_w;
    } else {
      base[j] = 0;
      h0[j] = -(1 << 30);
      w0[j] = 0;
    }
  }
  float ra[4], rb[4];
  auto fetch = [&](int kt) {
    const int k = kt * BK + lk;
    const bool kvalid = k < p.Kgemm;
    const int rs = p.div_cg.div(k);
    const int c = k - rs * p.Cg;
    const int r = p.div_s.div(rs);
    const int dh = r * p.dil_h, dw = (rs - r * p.S) * p.dil_w;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int h = h0[j] + dh, w = w0[j] + dw;
      const bool ok = kvalid && static_cast<unsigned>(h) < static_cast<unsigned>(p.H) &&
                      static_cast<unsigned>(w) < static_cast<unsigned>(p.W);
      ra[j] = ok ? Num<T>::to_f(x[base[j] + (static_cast<int64_t>(h) * p.W + w) * p.C + c]) : 0.f;
      const int n = n0 + lrow + 16 * j;
      rb[j] = (kvalid && n < p.Kg)
                  ? Num<T>::to_f(wt[(static_cast<int64_t>(g) * p.Kg + n) * p.Kgemm + k])
                  : 0.f;
    }
  };
  auto put = [&]() {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      As[lk][lrow + 16 * j] = ra[j];
      Bs[lk][lrow + 16 * j] = rb[j];
    }
  };

  const int tx = tid % 16, ty = tid / 16;  // outputs: rows ty*4.., cols tx*4..
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  if (KT > 0) {
    fetch(0);
    put();
  }
  __syncthreads();
  for (int kt = 0; kt < KT; ++kt) {
    if (kt + 1 < KT) fetch(kt + 1);  // in flight during the FMAs below
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      const float4 a = *reinterpret_cast<const float4*>(&As[kk][ty * 4]);
      const float4 b = *reinterpret_cast<const float4*>(&Bs[kk][tx * 4]);
      const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
    if (kt + 1 < KT) {
      put();
      __syncthreads();
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = m0 + ty * 4 + i;
    if (m >= p.M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = n0 + tx * 4 + j;
      if (n >= p.Kg) continue;
      const int gk = g * p.Kg + n;
      store_one<T>(p, static_cast<int64_t>(m) * p.K + gk, gk, acc[i][j]);
    }
  }
}

// ---------------------------------------------------------------------------
// Direct convolution for groups with few output channels (Kg < 16, e.g. ResNeXt
// with 4-8 channels per group), where a GEMM tile would be mostly empty and the
// layer is memory bound anyway; also for more groups than the GEMM kernels' grid
// takes. A thread computes up to 8 output channels of one (pixel, group);
// consecutive threads cover consecutive channels, so loads and stores coalesce.
// fp32 accumulation. Taps that fall on padding are skipped, not multiplied by
// zero: a NaN/Inf weight meets only the pixels it is applied to (the GEMM kernels
// multiply it by the padding's zeros too, giving NaN at the border).
template <typename T>
__global__ void __launch_bounds__(kDirectThreads) direct_conv_kernel(const ConvParams p, int k_blocks, int64_t total) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int kb = static_cast<int>(idx % k_blocks);
  const int64_t rest = idx / k_blocks;
  const int g = static_cast<int>(rest % p.groups);
  const int m = static_cast<int>(rest / p.groups);
  const int img = m / (p.P * p.Q);
  const int pq = m - img * (p.P * p.Q);
  const int pp = pq / p.Q, qq = pq - (pq / p.Q) * p.Q;
  const int k0 = kb * kDirectKPT;

  const T* x = static_cast<const T*>(p.x) + img * (static_cast<int64_t>(p.H) * p.W * p.C) +
               static_cast<int64_t>(g) * p.Cg;
  const T* wt = static_cast<const T*>(p.w) + (static_cast<int64_t>(g) * p.Kg + k0) * p.Kgemm;
  float acc[kDirectKPT];
#pragma unroll
  for (int j = 0; j < kDirectKPT; ++j) acc[j] = 0.f;
  for (int r = 0; r < p.R; ++r) {
    const int h = pp * p.stride_h - p.pad_h + r * p.dil_h;
    if (static_cast<unsigned>(h) >= static_cast<unsigned>(p.H)) continue;
    for (int s = 0; s < p.S; ++s) {
      const int w = qq * p.stride_w - p.pad_w + s * p.dil_w;
      if (static_cast<unsigned>(w) >= static_cast<unsigned>(p.W)) continue;
      const T* xp = x + (static_cast<int64_t>(h) * p.W + w) * p.C;
      const int kofs = (r * p.S + s) * p.Cg;
      for (int c = 0; c < p.Cg; ++c) {
        const float xv = Num<T>::to_f(xp[c]);
#pragma unroll
        for (int j = 0; j < kDirectKPT; ++j)
          if (k0 + j < p.Kg) acc[j] = fmaf(xv, Num<T>::to_f(wt[static_cast<int64_t>(j) * p.Kgemm + kofs + c]), acc[j]);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kDirectKPT; ++j) {
    if (k0 + j >= p.Kg) break;
    const int gk = g * p.Kg + k0 + j;
    store_one<T>(p, static_cast<int64_t>(m) * p.K + gk, gk, acc[j]);
  }
}

}  // namespace conv
}  // namespace resnet_fused
