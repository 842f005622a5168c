// The AVX2 + FMA vector type (8 float lanes) that our kernel templates take as V
// (winograd_kernel.h, conv1x1_epilogue_kernel.h). Include it only inside a
// target("avx2,fma") region (kernels_avx2.cpp), after <immintrin.h>.
#pragma once

#include <cstdint>

namespace resnet_fused {
namespace vec {
namespace {

struct Avx2 {
  using Reg = __m256;
  static constexpr int64_t kLanes = 8;
  static constexpr bool kBf16 = false;  // bfloat16 models need AVX-512

  // Lanes [0, n) of 8; masked forms only for channel tails (AMD runs the
  // masked store in microcode).
  static __m256i mask(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static Reg load(const float* p, int64_t n) {
    return n >= kLanes ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, mask(n));
  }
  static void store(float* p, Reg v, int64_t n) {
    if (n >= kLanes) {
      _mm256_storeu_ps(p, v);
    } else {
      _mm256_maskstore_ps(p, mask(n), v);
    }
  }
  static Reg zero() { return _mm256_setzero_ps(); }
  static Reg add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
  static Reg sub(Reg a, Reg b) { return _mm256_sub_ps(a, b); }
  static Reg mul(Reg a, Reg b) { return _mm256_mul_ps(a, b); }
  static Reg fmadd(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }  // a * b + c
  static Reg set1(float v) { return _mm256_set1_ps(v); }
  // Each group of kG lanes rotated by kJ: lane l takes lane l + kJ of its group (mod kG).
  template <int kG, int kJ>
  static Reg rotate(Reg v) {
    static_assert(kG == 4 || kG == 8, "groups of 4 or 8 lanes");
    if constexpr (kJ == 0) {
      return v;
    } else if constexpr (kG == 4) {  // within each 128-bit lane
      return _mm256_permute_ps(v, (kJ % 4) | ((kJ + 1) % 4) << 2 | ((kJ + 2) % 4) << 4 |
                                      ((kJ + 3) % 4) << 6);
    } else {
      return _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(kJ % 8, (kJ + 1) % 8, (kJ + 2) % 8,
                                                           (kJ + 3) % 8, (kJ + 4) % 8,
                                                           (kJ + 5) % 8, (kJ + 6) % 8,
                                                           (kJ + 7) % 8));
    }
  }
  // vmaxps returns its second operand when either is NaN: NaN propagates as in torch.relu.
  static Reg relu(Reg v) { return _mm256_max_ps(zero(), v); }
};

}  // namespace
}  // namespace vec
}  // namespace resnet_fused
