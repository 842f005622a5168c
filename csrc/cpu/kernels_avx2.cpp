// Our CPU kernel templates instantiated for AVX2 + FMA (8 float lanes): the Winograd
// kernel (winograd_kernel.h), conv1x1's epilogue (conv1x1_epilogue_kernel.h), the
// grouped 3x3 conv (grouped_conv_kernel.h) and the stem conv (stem_conv_kernel.h), on
// the vector type of vec_avx2.h. Called only when cpu_isa() says the CPU has it; the rest
// of the library stays baseline x86-64.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include <cstdint>

#include "cpu/conv1x1_epilogue.h"
#include "cpu/grouped_conv_problem.h"
#include "cpu/stem_conv_problem.h"
#include "cpu/winograd_problem.h"

#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#include "cpu/conv1x1_epilogue_kernel.h"
#include "cpu/grouped_conv_kernel.h"
#include "cpu/stem_conv_kernel.h"
#include "cpu/vec_avx2.h"
#include "cpu/winograd_kernel.h"

namespace resnet_fused {

void winograd::run_blocks_avx2(const Problem& p, int64_t first, int64_t last, float* scratch) {
  run_blocks<vec::Avx2>(p, first, last, scratch);
}

void conv1x1::epilogue_avx2(const float* c, const float* bias, const float* residual, float* out,
                           int64_t rows, int64_t ld, bool relu) {
  epilogue<vec::Avx2, float>(c, bias, residual, out, rows, ld, relu);
}

void grouped_conv::run_rows_avx2(const Problem& p, int64_t first, int64_t last) {
  run_rows<vec::Avx2>(p, first, last);
}

void stem_conv::run_rows_avx2(const Problem& p, int64_t first, int64_t last) {
  run_rows<vec::Avx2>(p, first, last);
}

}  // namespace resnet_fused

#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
