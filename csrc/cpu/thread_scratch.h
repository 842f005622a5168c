// Per-thread scratch memory for our CPU kernels (Winograd's V and M, conv1x1's product
// block), kept between calls and shared by them (one op runs at a time on a thread).
// Its start is aligned to a 64-byte cache line: std::vector's 16-byte alignment left
// the products' vector stores straddling lines in some processes and not in others,
// ResNet-50 at batch 1 then 1.07-1.09x slower in some runs (conv1x1 in layer1 and 2).
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
