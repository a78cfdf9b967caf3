// Huge-page-backed outputs of the CPU kernels, with a cache of freed blocks (huge_page_allocator.h).
#include "huge_page_allocator.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ExpandUtils.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#if defined(__linux__) && !defined(__ANDROID__)
#include <pthread.h>
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
// Room for the freed outputs of a training step with a few dozen 32 MiB
// activations; a step needing more reuses what fits and maps the rest anew.
constexpr int64_t kDefaultCacheLimitMiB = 1024;

int64_t threshold_from_env() {
  if (!SPARK_HUGE_PAGES_SUPPORTED) return 0;
  const char* raw = std::getenv("SPARK_EXT_HUGE_PAGES");
  const std::string v = raw == nullptr ? "" : raw;
  TORCH_CHECK_VALUE(v.empty() || v == "0" || v == "1",
                    "SPARK_EXT_HUGE_PAGES must be 0 (off) or 1 (on, the default), got '", v, "'");
  return v == "0" ? 0 : kDefaultThreshold;
}

int64_t cache_limit_from_env() {
  const char* raw = std::getenv("SPARK_EXT_HUGE_PAGE_CACHE_MIB");
  const std::string v = raw == nullptr ? "" : raw;
  // At most 9 digits: any such number of MiB fits in int64 bytes.
  TORCH_CHECK_VALUE(v.size() <= 9 && v.find_first_not_of("0123456789") == std::string::npos,
                    "SPARK_EXT_HUGE_PAGE_CACHE_MIB must be a whole number of MiB (0 turns the cache off, default ",
                    kDefaultCacheLimitMiB, "), got '", v, "'");
  return (v.empty() ? kDefaultCacheLimitMiB : std::stoll(v)) << 20;
}

std::atomic<int64_t>& threshold_slot() {
  static std::atomic<int64_t> slot{threshold_from_env()};
  return slot;
}

std::atomic<int64_t> huge_allocations{0};

#if SPARK_HUGE_PAGES_SUPPORTED

// One 2 MiB-aligned anonymous mapping; `bytes` is a multiple of kHugePage.
struct Block {
  void* ptr;
  size_t bytes;
};

// A new block advised for huge pages, or nullptr when the mapping fails.
Block* map_block(size_t bytes) {
  // Map one huge page more than asked, then unmap the unaligned head and what is left past the aligned block.
  const size_t span = bytes + kHugePage;
  void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + kHugePage - 1) & ~uintptr_t(kHugePage - 1);
  if (aligned > start) munmap(raw, aligned - start);
  if (start + span > aligned + bytes) munmap(reinterpret_cast<void*>(aligned + bytes), start + span - aligned - bytes);
  void* p = reinterpret_cast<void*>(aligned);
  // The advice only fails where THP is missing or off; the memory is then merely slower.
  (void)madvise(p, bytes, MADV_HUGEPAGE);
  return new Block{p, bytes};
}

void unmap_block(Block* b) {
  munmap(b->ptr, b->bytes);
  delete b;
}

// Freed blocks kept mapped for reuse, at most limit() bytes, least recently freed first out.
class BlockCache {
 public:
  explicit BlockCache(size_t limit) : limit_(limit) {}

  // A cached block of exactly `bytes` (the most recently freed: likeliest still in the CPU caches), or nullptr.
  Block* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t i = free_.size(); i-- > 0;) {
      if (free_[i]->bytes == bytes) {
        Block* b = free_[i];
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
        held_ -= bytes;
        return b;
      }
    }
    return nullptr;
  }

  // Keeps a block its tensor no longer uses (any thread), unmapping the oldest ones beyond the limit;
  // a block larger than the limit is unmapped at once, the others kept.
  void give(Block* b) {
    std::vector<Block*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (b->bytes <= limit_) {
        free_.push_back(b);
        held_ += b->bytes;
        evicted = evict_to(limit_);
      } else {
        evicted.push_back(b);
      }
    }
    for (Block* e : evicted) unmap_block(e);  // outside the lock: munmap is a system call
  }

  // Sets the limit (and the cache within it); returns the previous one.
  size_t set_limit(size_t limit) {
    std::vector<Block*> evicted;
    size_t previous;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      previous = limit_;
      limit_ = limit;
      evicted = evict_to(limit);
    }
    for (Block* e : evicted) unmap_block(e);
    return previous;
  }

  // Unmaps every cached block; returns the bytes released.
  size_t release() {
    std::vector<Block*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      evicted = evict_to(0);
    }
    size_t bytes = 0;
    for (Block* e : evicted) {
      bytes += e->bytes;
      unmap_block(e);
    }
    return bytes;
  }

  size_t held() {
    std::lock_guard<std::mutex> lock(mutex_);
    return held_;
  }

  size_t limit() {
    std::lock_guard<std::mutex> lock(mutex_);
    return limit_;
  }

  // fork() copies the mutex in whatever state another thread left it: held across
  // fork (pthread_atfork, as glibc's malloc does) so the child gets it unlocked.
  void lock_for_fork() { mutex_.lock(); }
  void unlock_after_fork() { mutex_.unlock(); }

 private:
  // Removes the least recently freed blocks until at most `keep` bytes remain; the caller holds mutex_.
  std::vector<Block*> evict_to(size_t keep) {
    size_t n = 0;
    while (held_ > keep) held_ -= free_[n++]->bytes;
    std::vector<Block*> evicted(free_.begin(), free_.begin() + static_cast<std::ptrdiff_t>(n));
    free_.erase(free_.begin(), free_.begin() + static_cast<std::ptrdiff_t>(n));
    return evicted;
  }

  std::mutex mutex_;
  std::vector<Block*> free_;  // least recently freed first
  size_t held_ = 0;           // bytes in free_
  size_t limit_;
};

// Never destroyed: outputs may be freed after static destructors ran (at exit).
BlockCache& cache() {
  static BlockCache* c = [] {
    auto* made = new BlockCache(static_cast<size_t>(cache_limit_from_env()));
    pthread_atfork([] { cache().lock_for_fork(); }, [] { cache().unlock_after_fork(); },
                   [] { cache().unlock_after_fork(); });
    return made;
  }();
  return *c;
}

// The DataPtr deleter of a huge-page output (its context is the Block).
void return_block(void* block) { cache().give(static_cast<Block*>(block)); }

#endif  // SPARK_HUGE_PAGES_SUPPORTED

class HugePageAllocator final : public c10::Allocator {
 public:
  // clear_reused: clear a cached block before handing it out, so that it reads zeros as a fresh mapping does.
  explicit HugePageAllocator(bool clear_reused) : clear_reused_(clear_reused) {}

  c10::DataPtr allocate(size_t n) override {
    const int64_t threshold = huge_page_threshold();
    if (threshold == 0 || n < static_cast<size_t>(threshold)) return c10::GetCPUAllocator()->allocate(n);
#if SPARK_HUGE_PAGES_SUPPORTED
    const size_t bytes = (n + kHugePage - 1) / kHugePage * kHugePage;
    BlockCache& blocks = cache();
    Block* b = blocks.take(bytes);
    if (b != nullptr && clear_reused_) std::memset(b->ptr, 0, n);
    if (b == nullptr) b = map_block(bytes);
    if (b == nullptr && blocks.release() > 0) b = map_block(bytes);  // the cached blocks may be what is missing
    // On failure the default allocator tries again and raises torch's out-of-memory error.
    if (b == nullptr) return c10::GetCPUAllocator()->allocate(n);
    huge_allocations.fetch_add(1, std::memory_order_relaxed);
    return {b->ptr, b, &return_block, c10::Device(c10::DeviceType::CPU)};
#else
    return c10::GetCPUAllocator()->allocate(n);
#endif
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  const bool clear_reused_;
};

// Storages keep a pointer to their allocator (resize_ allocates through it): both must outlive them.
// The kernels' outputs come from the first, then their storages are given the second.
HugePageAllocator* output_allocator() {
  static HugePageAllocator* a = new HugePageAllocator(/*clear_reused=*/false);
  return a;
}
HugePageAllocator* storage_allocator() {
  static HugePageAllocator* a = new HugePageAllocator(/*clear_reused=*/true);
  return a;
}

at::Tensor with_storage_allocator(at::TensorBase t) {
  t.storage().unsafeGetStorageImpl()->set_allocator(storage_allocator());
  return at::Tensor(std::move(t));
}

const c10::DispatchKeySet kCpuKeys(c10::DispatchKey::CPU);

}  // namespace

int64_t huge_page_threshold() { return threshold_slot().load(std::memory_order_relaxed); }

int64_t set_huge_page_threshold(int64_t bytes) {
  TORCH_CHECK_VALUE(bytes >= 0, "set_huge_page_threshold: bytes must be >= 0, got ", bytes);
  return threshold_slot().exchange(SPARK_HUGE_PAGES_SUPPORTED ? bytes : 0);
}

int64_t take_huge_page_allocations() { return huge_allocations.exchange(0); }

#if SPARK_HUGE_PAGES_SUPPORTED
int64_t huge_page_cache_bytes() { return static_cast<int64_t>(cache().held()); }
int64_t huge_page_cache_limit() { return static_cast<int64_t>(cache().limit()); }
int64_t set_huge_page_cache_limit(int64_t bytes) {
  TORCH_CHECK_VALUE(bytes >= 0, "set_huge_page_cache_limit: bytes must be >= 0, got ", bytes);
  return static_cast<int64_t>(cache().set_limit(static_cast<size_t>(bytes)));
}
int64_t empty_huge_page_cache() { return static_cast<int64_t>(cache().release()); }
#else
int64_t huge_page_cache_bytes() { return 0; }
int64_t huge_page_cache_limit() { return 0; }
int64_t set_huge_page_cache_limit(int64_t bytes) {
  TORCH_CHECK_VALUE(bytes >= 0, "set_huge_page_cache_limit: bytes must be >= 0, got ", bytes);
  return 0;
}
int64_t empty_huge_page_cache() { return 0; }
#endif

at::Tensor empty_output_like(const at::Tensor& like) {
  TORCH_CHECK(like.device().is_cpu() && like.layout() == at::kStrided,
              "internal: empty_output_like needs a strided CPU tensor");
  // at::empty_like's rule for the preserve format: keep dense strides, else a dense layout in the same dim order.
  const std::vector<int64_t> strides = like.is_non_overlapping_and_dense()
                                           ? like.strides().vec()
                                           : at::infer_dense_strides(like.sizes(), like.strides());
  return with_storage_allocator(
      at::detail::empty_strided_generic(like.sizes(), strides, output_allocator(), kCpuKeys, like.scalar_type()));
}

at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype) {
  return with_storage_allocator(at::detail::empty_generic(sizes, output_allocator(), kCpuKeys, dtype, c10::nullopt));
}

}  // namespace cpu
}  // namespace spark_ext

TORCH_LIBRARY_FRAGMENT(spark_ext, m) {
  m.def("huge_page_threshold() -> int", &spark_ext::cpu::huge_page_threshold);
  m.def("set_huge_page_threshold(int bytes) -> int", &spark_ext::cpu::set_huge_page_threshold);
  m.def("huge_page_allocations() -> int", &spark_ext::cpu::take_huge_page_allocations);
  m.def("huge_page_cache_bytes() -> int", &spark_ext::cpu::huge_page_cache_bytes);
  m.def("huge_page_cache_limit() -> int", &spark_ext::cpu::huge_page_cache_limit);
  m.def("set_huge_page_cache_limit(int bytes) -> int", &spark_ext::cpu::set_huge_page_cache_limit);
  m.def("empty_huge_page_cache() -> int", &spark_ext::cpu::empty_huge_page_cache);
}
