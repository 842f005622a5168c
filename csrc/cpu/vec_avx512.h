// The AVX-512F vector type (16 float lanes) that our kernel templates take as V
// (winograd_kernel.h, conv1x1_epilogue_kernel.h). Include it only inside a
// target("avx512f") region (kernels_avx512.cpp), after <immintrin.h>.
#pragma once

#include <cstdint>

namespace resnet_fused {
namespace vec {
namespace {

struct Avx512 {
  using Reg = __m512;
  static constexpr int64_t kLanes = 16;
  static constexpr bool kBf16 = true;

  // The maskz forms of intrinsics with all lanes on (kAll): GCC 12 warns on the plain
  // ones' internals.
  static constexpr __mmask16 kAll = 0xFFFF;
  static __mmask16 mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static Reg load(const float* p, int64_t n) {
    return n >= kLanes ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(mask(n), p);
  }
  static void store(float* p, Reg v, int64_t n) {
    if (n >= kLanes) {
      _mm512_storeu_ps(p, v);
    } else {
      _mm512_mask_storeu_ps(p, mask(n), v);
    }
  }
  // bfloat16 (raw bits), 16 at a time: the ops run bfloat16 only on whole vectors
  // (Winograd: C and K multiples of 16; conv1x1: 64-channel blocks), so n is always 16.
  static Reg load(const uint16_t* p, int64_t) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m512i w = _mm512_maskz_cvtepu16_epi32(kAll, h);
    return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(kAll, w, 16));
  }
  // Rounded to nearest even, as torch rounds to bfloat16; NaN stays NaN (quieted).
  static void store(uint16_t* p, Reg v, int64_t) {
    const __m512i b = _mm512_castps_si512(v);
    const __m512i lsb =
        _mm512_and_si512(_mm512_maskz_srli_epi32(kAll, b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(b, _mm512_set1_epi32(0x00400000)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_maskz_cvtepi32_epi16(kAll, _mm512_maskz_srli_epi32(kAll, r, 16)));
  }
  static Reg zero() { return _mm512_setzero_ps(); }
  static Reg add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
  static Reg sub(Reg a, Reg b) { return _mm512_sub_ps(a, b); }
  static Reg mul(Reg a, Reg b) { return _mm512_mul_ps(a, b); }
  static Reg fmadd(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c
  static Reg set1(float v) { return _mm512_set1_ps(v); }
  // Each group of kG lanes rotated by kJ: lane l takes lane l + kJ of its group (mod kG).
  template <int kG, int kJ>
  static Reg rotate(Reg v) {
    static_assert(kG == 4 || kG == 8, "groups of 4 or 8 lanes");
    if constexpr (kJ == 0) {
      return v;
    } else if constexpr (kG == 4) {  // within each 128-bit lane
      // (The maskz forms: GCC 12 warns on the plain ones' internals, as in relu.)
      return _mm512_maskz_permute_ps(0xFFFF, v, (kJ % 4) | ((kJ + 1) % 4) << 2 |
                                                    ((kJ + 2) % 4) << 4 | ((kJ + 3) % 4) << 6);
    } else {
      const __m512i lane = _mm512_set_epi32(
          8 + (kJ + 7) % 8, 8 + (kJ + 6) % 8, 8 + (kJ + 5) % 8, 8 + (kJ + 4) % 8, 8 + (kJ + 3) % 8,
          8 + (kJ + 2) % 8, 8 + (kJ + 1) % 8, 8 + kJ % 8, (kJ + 7) % 8, (kJ + 6) % 8, (kJ + 5) % 8,
          (kJ + 4) % 8, (kJ + 3) % 8, (kJ + 2) % 8, (kJ + 1) % 8, kJ % 8);
      return _mm512_maskz_permutexvar_ps(0xFFFF, lane, v);
    }
  }
  // vmaxps returns its second operand when either is NaN: NaN propagates as in
  // torch.relu. (The maskz form: GCC 12 warns on the plain one's internals.)
  static Reg relu(Reg v) { return _mm512_maskz_max_ps(0xFFFF, zero(), v); }
};

}  // namespace
}  // namespace vec
}  // namespace resnet_fused
