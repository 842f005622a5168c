// One grouped_conv3x3 call as the ISA-specific kernels see it: raw pointers and sizes
// only, so that those kernels include no ATen code.
#pragma once

#include <cstdint>

namespace resnet_fused {
namespace grouped_conv {

// Output channels per weight block at least (a 16-lane vector): a block holds one
// group's Kg output channels where Kg is a multiple of it, else 16 / Kg whole groups.
constexpr int64_t kMinBlock = 16;

inline int64_t block_channels(int64_t Kg) { return Kg > kMinBlock ? Kg : kMinBlock; }

// The layouts the kernels compute: Kg a multiple of 16 (vectors of one group's output
// channels, its inputs broadcast), or Kg = Cg = 4 or 8 (a vector holds whole groups,
// whose inputs are the vector's own channels, rotated within each group).
inline bool layout_fits(int64_t Cg, int64_t Kg) {
  return Kg % kMinBlock == 0 || ((Kg == 4 || Kg == 8) && Cg == Kg);
}

struct Problem {
  const float* input;     // channels_last [N, C, H, W]
  const float* weight;    // [K / L, 3 * 3, Cg, L]: resnet_fused.ops.grouped_conv_weight
  const float* bias;      // [K] or null
  const float* residual;  // channels_last [N, K, OH, OW] or null
  float* out;             // channels_last [N, K, OH, OW]
  const float* zeros;     // max(Cg, 16) zeros: the padding's pixels
  bool relu;
  int64_t N, C, H, W, K, OH, OW, stride;  // padding 1
  int64_t Cg, Kg, L;                      // per group; L = block_channels(Kg)
};

// Items [first, last) of (image, output row, weight block), row-major: each is one
// output row's L channels of one block.
void run_rows_avx2(const Problem& p, int64_t first, int64_t last);
void run_rows_avx512(const Problem& p, int64_t first, int64_t last);

}  // namespace grouped_conv
}  // namespace resnet_fused
