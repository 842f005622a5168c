// Per-thread scratch memory for our CPU kernels (Winograd's V and M, conv1x1's product
// block), kept between calls and shared by them (one op runs at a time on a thread).
// Its start is aligned to a 64-byte cache line (std::vector's is 16 bytes), so that
// the 16-float vector loads and stores of the blocks in it never straddle two lines.
#pragma once

#include <cstdint>
#include <vector>

namespace resnet_fused {

inline float* thread_scratch(int64_t floats) {
  constexpr int64_t kLine = 64 / sizeof(float);
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < floats + kLine) buffer.resize(floats + kLine);
  const auto misalign = reinterpret_cast<std::uintptr_t>(buffer.data()) % 64;
  return buffer.data() + (misalign ? (64 - misalign) / sizeof(float) : 0);
}

}  // namespace resnet_fused
