// CPU huge_page_copy: a copy of a tensor in memory of its own that the kernel backs with
// transparent huge pages (Linux, THP "always" or "madvise"). FusedResNet moves its large
// pre-transformed weights there when it makes them (resnet_fused/huge_pages.py says why).
//
// The mapping starts on a huge-page boundary and ends at the tensor's last small page:
// the head and tail of the over-sized mmap are unmapped again, so a partly used last
// huge page stays in small pages and the copy costs no memory beyond the tensor.
#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace resnet_fused {
namespace {

using at::Tensor;

Tensor huge_page_copy_cpu(const Tensor& input, int64_t huge_page_bytes) {
  TORCH_CHECK(huge_page_bytes > 0 && huge_page_bytes <= (int64_t{1} << 30) &&
                  (huge_page_bytes & (huge_page_bytes - 1)) == 0,
              "huge_page_copy: expected huge_page_bytes a power of two up to 2^30, got ",
              huge_page_bytes);
  // empty_like's strides: a dense tensor keeps its own (channels_last stays channels_last),
  // any other gets dense ones in the same order of dimensions.
  const std::vector<int64_t> strides = at::infer_dense_strides(input.sizes(), input.strides());
  const auto options = input.options().requires_grad(false);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t bytes = static_cast<size_t>(input.numel()) * input.element_size();
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t huge = static_cast<size_t>(huge_page_bytes);
  const size_t length = (bytes + page - 1) / page * page;
  void* base = bytes == 0 || length > SIZE_MAX - huge
                   ? MAP_FAILED
                   : mmap(nullptr, length + huge, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (base != MAP_FAILED) {
    const uintptr_t first = reinterpret_cast<uintptr_t>(base);
    const uintptr_t start = (first + huge - 1) / huge * huge;
    const uintptr_t stop = first + length + huge;
    if (start > first) munmap(base, start - first);
    if (stop > start + length) {
      munmap(reinterpret_cast<void*>(start + length), stop - start - length);
    }
    void* data = reinterpret_cast<void*>(start);
    // Refused (THP "never", an old kernel): small pages, still a correct copy.
    madvise(data, length, MADV_HUGEPAGE);
    Tensor out;
    try {
      out = at::from_blob(
          data, input.sizes(), strides, [length](void* p) { munmap(p, length); }, options);
    } catch (...) {
      munmap(data, length);
      throw;
    }
    out.copy_(input);
    return out;
  }
#endif
  return at::empty_strided(input.sizes(), strides, options).copy_(input);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) { m.impl("huge_page_copy", &huge_page_copy_cpu); }

}  // namespace resnet_fused
