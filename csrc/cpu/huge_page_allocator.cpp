// Huge-page-backed outputs of the CPU kernels (huge_page_allocator.h).
#include "huge_page_allocator.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ExpandUtils.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__linux__) && !defined(__ANDROID__)
#include <sys/mman.h>
#define SPARK_HUGE_PAGES_SUPPORTED 1
#else
#define SPARK_HUGE_PAGES_SUPPORTED 0
#endif

namespace spark_ext {
namespace cpu {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;  // x86-64 and arm64 (4 KiB base pages) THP size
// glibc serves blocks under 32 MiB (its largest mmap threshold) from a heap it
// keeps, so in a loop they are reused without faults, and the 2 MiB-aligned
// path measured no faster there, sometimes slower (docs/design.md, "Huge-page
// outputs"); from 32 MiB every block is a fresh mapping and huge pages halve the time.
constexpr int64_t kDefaultThreshold = int64_t(32) << 20;

int64_t threshold_from_env() {
  if (!SPARK_HUGE_PAGES_SUPPORTED) return 0;
  const char* raw = std::getenv("SPARK_EXT_HUGE_PAGES");
  const std::string v = raw == nullptr ? "" : raw;
  TORCH_CHECK_VALUE(v.empty() || v == "0" || v == "1",
                    "SPARK_EXT_HUGE_PAGES must be 0 (off) or 1 (on, the default), got '", v, "'");
  return v == "0" ? 0 : kDefaultThreshold;
}

std::atomic<int64_t>& threshold_slot() {
  static std::atomic<int64_t> slot{threshold_from_env()};
  return slot;
}

std::atomic<int64_t> huge_allocations{0};

#if SPARK_HUGE_PAGES_SUPPORTED
void free_huge(void* p) { std::free(p); }
#endif

class HugePageAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    const int64_t threshold = huge_page_threshold();
    if (threshold == 0 || n < static_cast<size_t>(threshold)) return c10::GetCPUAllocator()->allocate(n);
#if SPARK_HUGE_PAGES_SUPPORTED
    void* p = nullptr;
    // On failure the default allocator tries again and raises torch's out-of-memory error.
    if (posix_memalign(&p, kHugePage, n) != 0) return c10::GetCPUAllocator()->allocate(n);
    // The advice only fails where THP is missing or off; the memory is then merely slower.
    (void)madvise(p, n, MADV_HUGEPAGE);
    huge_allocations.fetch_add(1, std::memory_order_relaxed);
    return {p, p, &free_huge, c10::Device(c10::DeviceType::CPU)};
#else
    return c10::GetCPUAllocator()->allocate(n);
#endif
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

// Storages keep a pointer to their allocator (resize_ allocates through it): it must outlive them.
HugePageAllocator* allocator() {
  static HugePageAllocator* a = new HugePageAllocator();
  return a;
}

const c10::DispatchKeySet kCpuKeys(c10::DispatchKey::CPU);

}  // namespace

int64_t huge_page_threshold() { return threshold_slot().load(std::memory_order_relaxed); }

int64_t set_huge_page_threshold(int64_t bytes) {
  TORCH_CHECK_VALUE(bytes >= 0, "set_huge_page_threshold: bytes must be >= 0, got ", bytes);
  return threshold_slot().exchange(SPARK_HUGE_PAGES_SUPPORTED ? bytes : 0);
}

int64_t take_huge_page_allocations() { return huge_allocations.exchange(0); }

at::Tensor empty_output_like(const at::Tensor& like) {
  TORCH_CHECK(like.device().is_cpu() && like.layout() == at::kStrided,
              "internal: empty_output_like needs a strided CPU tensor");
  // at::empty_like's rule for the preserve format: keep dense strides, else a dense layout in the same dim order.
  const std::vector<int64_t> strides = like.is_non_overlapping_and_dense()
                                           ? like.strides().vec()
                                           : at::infer_dense_strides(like.sizes(), like.strides());
  return at::detail::empty_strided_generic(like.sizes(), strides, allocator(), kCpuKeys, like.scalar_type());
}

at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_generic(sizes, allocator(), kCpuKeys, dtype, c10::nullopt);
}

}  // namespace cpu
}  // namespace spark_ext

TORCH_LIBRARY_FRAGMENT(spark_ext, m) {
  m.def("huge_page_threshold() -> int", &spark_ext::cpu::huge_page_threshold);
  m.def("set_huge_page_threshold(int bytes) -> int", &spark_ext::cpu::set_huge_page_threshold);
  m.def("huge_page_allocations() -> int", &spark_ext::cpu::take_huge_page_allocations);
}
