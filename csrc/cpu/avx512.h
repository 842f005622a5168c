// For CPU kernels written for AVX-512 around oneDNN's fp32 GEMM micro-kernel
// (ATen's cpublas::brgemm): winograd.cpp.
//
// Only functions marked RESNET_FUSED_AVX512 are compiled for AVX-512; the rest of
// the library stays baseline x86-64 and calls them after avx512_kernels_supported().
#pragma once

#include <cstdint>

#if defined(__GNUC__) && defined(__x86_64__) && __has_include(<ATen/native/CPUBlas.h>)
#include <ATen/native/CPUBlas.h>
#if defined(CPUBLAS_BRGEMM_F32F32F32)
#define RESNET_FUSED_AVX512_KERNELS 1
#include <immintrin.h>
#endif
#endif

namespace resnet_fused {

// Built with these kernels, and the CPU has AVX-512F.
bool avx512_kernels_supported();

#ifdef RESNET_FUSED_AVX512_KERNELS
#define RESNET_FUSED_AVX512 __attribute__((target("avx512f")))

// Lanes [c, c + 16) that exist, as a mask (channel counts need not be multiples of 16).
RESNET_FUSED_AVX512 inline __mmask16 lanes(int64_t c, int64_t count) {
  const int64_t n = count - c < 16 ? count - c : 16;
  return static_cast<__mmask16>((1u << n) - 1u);
}

// C (m x n) = A (m x k) @ B (k x n), row-major with leading dimensions lda, ldb, ldc.
inline void gemm_f32(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                     int64_t ldb, float* c, int64_t ldc) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, /*add_C=*/false, a, b, c,
                              /*is_vnni=*/false);
}
#endif

}  // namespace resnet_fused
