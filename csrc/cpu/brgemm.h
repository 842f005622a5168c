// oneDNN's batch-reduce GEMM micro-kernel, as ATen exposes it (cpublas::brgemm): the
// products of our Winograd and 1x1 kernels. Not every torch has it, nor does every
// CPU run it, so callers ask first.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace resnet_fused {

// Whether this torch's fp32 (bfloat16) brgemm runs on this CPU and sums right.
bool brgemm_f32_available();
bool brgemm_bf16_available();

// C (m x n, float) = A (m x k) @ B (k x n), row-major with leading dimensions lda,
// ldb, ldc (C += A @ B where accumulate); B in VNNI row pairs for bfloat16. Call only
// where available.
void brgemm_f32(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc,
                const float* a, const float* b, float* c, bool accumulate = false);
void brgemm_bf16(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc,
                 const c10::BFloat16* a, const c10::BFloat16* b, float* c,
                 bool accumulate = false);

// Whether the bfloat16 brgemm may be called now: available, and oneDNN not turned off
// (under torch.backends.mkldnn.flags(enabled=False) ATen's bfloat16 brgemm throws).
bool brgemm_bf16_enabled();

// On AMX CPUs the bfloat16 brgemm holds the tile registers until released.
void brgemm_release();

}  // namespace resnet_fused
