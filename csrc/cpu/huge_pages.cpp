// CPU huge_page_copy: a copy of a tensor in memory of its own that the kernel backs with
// transparent huge pages (Linux, THP "always" or "madvise"). FusedResNet moves its large
// pre-transformed weights there once, at fold time (resnet_fused/huge_pages.py says why).
//
// The mapping starts on a huge-page boundary and ends at the tensor's last 4 KiB page:
// the head and tail of the over-sized mmap are unmapped again, so a partly used last
// huge page stays in small pages and the copy costs no memory beyond the tensor.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace resnet_fused {
namespace {

using at::Tensor;

Tensor huge_page_copy_cpu(const Tensor& input, int64_t huge_page_bytes) {
  TORCH_CHECK(input.device().is_cpu() && input.layout() == at::kStrided,
              "huge_page_copy: expected a strided CPU tensor, got ", input.layout(), " on ",
              input.device());
  TORCH_CHECK(huge_page_bytes > 0 && (huge_page_bytes & (huge_page_bytes - 1)) == 0,
              "huge_page_copy: expected huge_page_bytes a power of two, got ", huge_page_bytes);
  // A dense tensor keeps its strides (channels_last stays channels_last).
  const c10::DimVector strides = input.is_non_overlapping_and_dense()
                                     ? c10::DimVector(input.strides())
                                     : c10::contiguous_strides(input.sizes());
  const auto options = input.options().requires_grad(false);
#if defined(__linux__)
  const size_t bytes = static_cast<size_t>(input.numel()) * input.element_size();
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t huge = static_cast<size_t>(huge_page_bytes);
  const size_t length = (bytes + page - 1) / page * page;
  void* base = bytes == 0 ? MAP_FAILED
                          : mmap(nullptr, length + huge, PROT_READ | PROT_WRITE,
                                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base != MAP_FAILED) {
    const uintptr_t first = reinterpret_cast<uintptr_t>(base);
    const uintptr_t start = (first + huge - 1) / huge * huge;
    const uintptr_t stop = first + length + huge;
    if (start > first) munmap(base, start - first);
    if (stop > start + length) munmap(reinterpret_cast<void*>(start + length), stop - start - length);
    void* data = reinterpret_cast<void*>(start);
    // Refused (THP "never", an old kernel): small pages, still a correct copy.
    madvise(data, length, MADV_HUGEPAGE);
    Tensor out = at::from_blob(
        data, input.sizes(), strides, [length](void* p) { munmap(p, length); }, options);
    out.copy_(input);
    return out;
  }
#endif
  return at::empty_strided(input.sizes(), strides, options).copy_(input);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) { m.impl("huge_page_copy", &huge_page_copy_cpu); }

}  // namespace resnet_fused
