// CPU im2col: a convolution's input patches as the rows of a matrix, so that a small
// convolution runs as one matrix product (conv1x1 on the result; dispatch.py says where).
// Output (n, oh, ow) holds, tap after tap ((kh, kw) row-major over [tap_begin,
// tap_end)), the C channels of input pixel (oh * stride + kh * dilation - padding, ...),
// or zeros where that pixel lies in the padding: channels_last [N, taps * C, OH, OW] with
// OH, OW the whole kernel's output size. Taking only some taps lets a caller leave out
// those that read nothing but padding (a 3x3 conv on a 1x1 input needs its centre only).
//
// Any dtype: the channels of a pixel are copied as bytes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

namespace resnet_fused {
namespace {

using at::IntArrayRef;
using at::Tensor;

void check_im2col_args(const Tensor& input, IntArrayRef kernel_size, IntArrayRef stride,
                       IntArrayRef padding, IntArrayRef dilation, IntArrayRef tap_begin,
                       IntArrayRef tap_end) {
  constexpr const char* op = "im2col";
  TORCH_CHECK(input.dim() == 4, op, ": expected input to be 4-D (N, C, H, W), got ", input.dim(),
              "-D with shape ", input.sizes());
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 &&
                  dilation.size() == 2 && tap_begin.size() == 2 && tap_end.size() == 2,
              op, ": expected kernel_size, stride, padding, dilation, tap_begin and tap_end of "
              "length 2, got ", kernel_size, ", ", stride, ", ", padding, ", ", dilation, ", ",
              tap_begin, ", ", tap_end);
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK(kernel_size[d] > 0 && stride[d] > 0 && dilation[d] > 0 && padding[d] >= 0, op,
                ": expected kernel_size, stride and dilation > 0 and padding >= 0, got ",
                kernel_size, ", ", stride, ", ", dilation, ", ", padding);
    TORCH_CHECK(0 <= tap_begin[d] && tap_begin[d] < tap_end[d] && tap_end[d] <= kernel_size[d],
                op, ": expected 0 <= tap_begin < tap_end <= kernel_size ", kernel_size,
                " along each axis, got tap_begin ", tap_begin, " and tap_end ", tap_end);
    const int64_t in = input.size(d + 2) + 2 * padding[d];
    const int64_t k = dilation[d] * (kernel_size[d] - 1) + 1;
    TORCH_CHECK(in >= k, op, ": input spatial size ", input.sizes().slice(2), " with padding ",
                padding, " is smaller than the kernel ", kernel_size, " with dilation ",
                dilation);
  }
}

Tensor im2col_cpu(const Tensor& input, IntArrayRef kernel_size, IntArrayRef stride,
                  IntArrayRef padding, IntArrayRef dilation, IntArrayRef tap_begin,
                  IntArrayRef tap_end) {
  check_im2col_args(input, kernel_size, stride, padding, dilation, tap_begin, tap_end);
  const auto cl = at::MemoryFormat::ChannelsLast;
  const Tensor x = input.contiguous(cl);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t OH = (H + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) / stride[0] + 1;
  const int64_t OW = (W + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) / stride[1] + 1;
  const int64_t TH = tap_end[0] - tap_begin[0], TW = tap_end[1] - tap_begin[1];
  Tensor out = at::empty({N, TH * TW * C, OH, OW}, x.options().memory_format(cl));
  const int64_t pixel_bytes = C * static_cast<int64_t>(x.element_size());
  if (out.numel() == 0) return out;
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t row_bytes = TH * TW * pixel_bytes;
  // Each thread copies at least ~64 KiB: below that, waking the other threads costs
  // more than the copy (a few microseconds).
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / row_bytes);
  at::parallel_for(0, N * OH * OW, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t ow = r % OW, oh = r / OW % OH, n = r / (OW * OH);
      char* row = dst + r * row_bytes;
      // Along a kernel row the taps [j0, j1) read pixels inside the image; the others
      // read padding (zeros). At dilation 1 those pixels are adjacent: one copy.
      const int64_t iw0 = ow * stride[1] + tap_begin[1] * dilation[1] - padding[1];
      int64_t j0 = 0, j1 = TW;  // counted from tap_begin[1]
      while (j0 < TW && iw0 + j0 * dilation[1] < 0) ++j0;
      while (j1 > j0 && iw0 + (j1 - 1) * dilation[1] >= W) --j1;
      for (int64_t i = tap_begin[0]; i < tap_end[0]; ++i, row += TW * pixel_bytes) {
        const int64_t ih = oh * stride[0] + i * dilation[0] - padding[0];
        if (ih < 0 || ih >= H || j0 == j1) {
          std::memset(row, 0, TW * pixel_bytes);  // all-zero bits: 0.0 in float and bfloat16
          continue;
        }
        std::memset(row, 0, j0 * pixel_bytes);
        const char* line = src + ((n * H + ih) * W + iw0) * pixel_bytes;
        if (dilation[1] == 1) {
          std::memcpy(row + j0 * pixel_bytes, line + j0 * pixel_bytes, (j1 - j0) * pixel_bytes);
        } else {
          for (int64_t j = j0; j < j1; ++j)
            std::memcpy(row + j * pixel_bytes, line + j * dilation[1] * pixel_bytes, pixel_bytes);
        }
        std::memset(row + j1 * pixel_bytes, 0, (TW - j1) * pixel_bytes);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) { m.impl("im2col", &im2col_cpu); }

}  // namespace resnet_fused
