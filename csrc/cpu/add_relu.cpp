// CPU add_relu: relu(a + b) in one pass over memory. TensorIterator handles
// layouts (the output follows a's memory format); the inner loop is a plain
// contiguous loop the compiler vectorizes, with a strided fallback.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorIterator.h>
#include <torch/library.h>

#include "checks.h"

namespace resnet_fused {
namespace {

using at::Tensor;

// NaN < 0 is false, so NaN passes through as it does in torch.relu.
template <typename acc_t>
inline acc_t relu_nan(acc_t v) {
  return v < acc_t(0) ? acc_t(0) : v;
}

void add_relu_kernel(at::TensorIteratorBase& iter) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, iter.common_dtype(), "add_relu_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    iter.for_each([](char** data, const int64_t* strides, int64_t n, int64_t m) {
      for (int64_t j = 0; j < m; ++j) {
        auto* out = data[0] + j * strides[3];
        const auto* a = data[1] + j * strides[4];
        const auto* b = data[2] + j * strides[5];
        const int64_t e = sizeof(scalar_t);
        if (strides[0] == e && strides[1] == e && strides[2] == e) {
          auto* o = reinterpret_cast<scalar_t*>(out);
          const auto* x = reinterpret_cast<const scalar_t*>(a);
          const auto* y = reinterpret_cast<const scalar_t*>(b);
          for (int64_t i = 0; i < n; ++i) {
            o[i] = static_cast<scalar_t>(relu_nan(static_cast<acc_t>(x[i]) + static_cast<acc_t>(y[i])));
          }
        } else {
          for (int64_t i = 0; i < n; ++i) {
            const acc_t v = static_cast<acc_t>(*reinterpret_cast<const scalar_t*>(a + i * strides[1])) +
                            static_cast<acc_t>(*reinterpret_cast<const scalar_t*>(b + i * strides[2]));
            *reinterpret_cast<scalar_t*>(out + i * strides[0]) = static_cast<scalar_t>(relu_nan(v));
          }
        }
      }
    });
  });
}

at::TensorIterator make_iter(const Tensor& out, const Tensor& a, const Tensor& b) {
  return at::TensorIteratorConfig()
      .add_output(out)
      .add_const_input(a)
      .add_const_input(b)
      .check_all_same_dtype(true)
      .build();
}

Tensor add_relu_cpu(const Tensor& a, const Tensor& b) {
  check_add_relu_args(a, b);
  Tensor out = at::empty_like(a);  // a's layout, as the fake kernel says
  auto iter = make_iter(out, a, b);
  add_relu_kernel(iter);
  return out;
}

void add_relu_cpu_(Tensor& a, const Tensor& b) {
  check_add_relu_inplace_args(a, b);
  if (at::get_overlap_status(a, b) == at::MemOverlapStatus::TooHard) {
    // a or b is not dense (a slice, an expanded b), so whether b reads elements that
    // the pass already wrote cannot be ruled out: compute first, then write a once.
    a.copy_(add_relu_cpu(a, b));
    return;
  }
  auto iter = make_iter(a, a, b);
  add_relu_kernel(iter);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("add_relu", &add_relu_cpu);
  m.impl("add_relu_", &add_relu_cpu_);
}

}  // namespace resnet_fused
