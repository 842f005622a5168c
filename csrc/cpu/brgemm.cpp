#include "cpu/brgemm.h"

#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>
#include <torch/version.h>

#include <algorithm>
#include <exception>
#include <type_traits>

// ATen declares its fp32 brgemm from torch 2.6; the macro that says so came later.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) &&        \
    (defined(CPUBLAS_BRGEMM_F32F32F32) ||                                       \
     TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 6))
#define RESNET_FUSED_BRGEMM 1
#else
#define RESNET_FUSED_BRGEMM 0
#endif

namespace resnet_fused {

#if RESNET_FUSED_BRGEMM
void brgemm_f32(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc,
                const float* a, const float* b, float* c, bool accumulate) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, /*add_C=*/accumulate, a, b, c,
                              /*is_vnni=*/false);
}

void brgemm_bf16(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc,
                 const c10::BFloat16* a, const c10::BFloat16* b, float* c, bool accumulate) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, /*add_C=*/accumulate, a, b, c,
                              /*is_vnni=*/true);
}

void brgemm_release() { at::native::cpublas::brgemm_release(); }

namespace {

// Asked once per element type on a product of ones, 1x2 by 2x16 (the same 32 ones
// in VNNI pairs): the micro-kernel is oneDNN's, and a torch or CPU without it throws.
template <class T>
bool product_of_ones_runs() {
  try {
    T a[2], b[32];
    std::fill(a, a + 2, T(1.0f));
    std::fill(b, b + 32, T(1.0f));
    float c[16];
    if constexpr (std::is_same<T, float>::value) {
      brgemm_f32(1, 16, 2, 2, 16, 16, a, b, c);
    } else {
      brgemm_bf16(1, 16, 2, 2, 16, 16, a, b, c);
      brgemm_release();
    }
    return std::all_of(c, c + 16, [](float v) { return v == 2.0f; });
  } catch (const std::exception&) {
    return false;
  }
}

}  // namespace

bool brgemm_f32_available() {
  static const bool ok = product_of_ones_runs<float>();
  return ok;
}

bool brgemm_bf16_available() {
  static const bool ok = product_of_ones_runs<c10::BFloat16>();
  return ok;
}

bool brgemm_bf16_enabled() {
  return brgemm_bf16_available() && at::globalContext().userEnabledMkldnn();
}
#else
bool brgemm_f32_available() { return false; }
bool brgemm_bf16_available() { return false; }
bool brgemm_bf16_enabled() { return false; }
void brgemm_f32(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const float*, const float*,
                float*, bool) {}
void brgemm_bf16(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const c10::BFloat16*,
                 const c10::BFloat16*, float*, bool) {}
void brgemm_release() {}
#endif

}  // namespace resnet_fused
