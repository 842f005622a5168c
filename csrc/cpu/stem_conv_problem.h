// One stem_conv call as the ISA-specific kernels see it: raw pointers and sizes only,
// so that those kernels include no ATen code.
#pragma once

#include <cstdint>

namespace resnet_fused {
namespace stem_conv {

// K must be a multiple of this: a run's sums cover two vectors of output channels
// (32 with AVX-512, 16 with AVX2).
constexpr int64_t kBlock = 32;

struct Problem {
  const float* input;     // [N, C, Hp, Wp]: each input plane with its zero padding written out
  const float* weight;    // [R, C, S, K]: resnet_fused.ops.stem_conv_weight
  const float* bias;      // [K] or null
  const float* residual;  // channels_last [N, K, OH, OW] or null
  float* out;             // channels_last [N, K, OH, OW]
  bool relu;
  int64_t N, C, Hp, Wp, K, R, S, OH, OW, stride;  // stride 1 or 2
};

// Items [first, last) of (image, output row): each is one output row, all K channels.
void run_rows_avx2(const Problem& p, int64_t first, int64_t last);
void run_rows_avx512(const Problem& p, int64_t first, int64_t last);

}  // namespace stem_conv
}  // namespace resnet_fused
