// Output tensors of the CPU kernels backed by transparent huge pages, kept for reuse.
//
// A freshly allocated large output is written once by a kernel; with 4 KiB
// pages every page costs a fault that zeroes it (8192 faults for a 32 MiB
// output), and that, not the kernel, was most of an op's time. With
// MADV_HUGEPAGE the kernel maps 2 MiB pages instead (512x fewer faults), when
// /sys/kernel/mm/transparent_hugepage/enabled is `always` or `madvise`. Under
// `never` the advice is ignored: outputs are then only slower, never wrong.
//
// Outputs of at least huge_page_threshold() bytes (32 MiB: below it glibc
// reuses freed blocks without faults) come from 2 MiB-aligned anonymous
// mappings, rounded up to whole 2 MiB pages, with that advice; smaller ones,
// and all of them off Linux or with SPARK_EXT_HUGE_PAGES=0, come from
// c10::GetCPUAllocator(). The tensors are ordinary resizable CPU tensors
// (their storage keeps this allocator).
//
// A freed block is not unmapped but cached, keyed by its size, and the next
// output of that size takes it: its pages are already faulted in, so neither
// the faults nor the memory compaction the kernel may run to find a free
// 2 MiB page on a fault (`defrag` = `madvise`: tens of ms, now and then) are
// paid again. The cache holds at most huge_page_cache_limit() bytes
// (SPARK_EXT_HUGE_PAGE_CACHE_MIB, default 1 GiB), unmapping the least
// recently freed blocks beyond it; empty_huge_page_cache() unmaps them all,
// as torch.cuda.empty_cache() does on the GPU. A block in use is never cached.
//
// Contents: a kernel output is written whole by its kernel, so a reused block
// is handed to the kernel as it is. Any other allocation through the storage's
// allocator (resize_ growing a storage) reads zeros beyond the old contents,
// as a fresh mapping does: a reused block is cleared first.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace spark_ext {
namespace cpu {

// Smallest output, in bytes, that gets huge pages; 0 when the path is off.
int64_t huge_page_threshold();

// Test-only: sets the threshold (0 turns the path off); returns the previous one.
int64_t set_huge_page_threshold(int64_t bytes);

// Test-only: how many outputs took the huge-page path (new or cached block) since the last call; clears the count.
int64_t take_huge_page_allocations();

// Bytes of freed huge-page blocks the cache holds for reuse.
int64_t huge_page_cache_bytes();

// Most bytes the cache holds.
int64_t huge_page_cache_limit();

// Sets the cache's limit (0: no caching), unmapping the least recently freed blocks beyond it; returns the old one.
int64_t set_huge_page_cache_limit(int64_t bytes);

// Unmaps every cached block (outputs in use are untouched); returns the bytes released.
int64_t empty_huge_page_cache();

// at::empty_like(like) (default options: like's dtype, strides kept as empty_like keeps them).
// The caller must write every element: a reused block keeps its previous contents.
at::Tensor empty_output_like(const at::Tensor& like);

// at::empty(sizes, dtype) on the CPU, contiguous. The caller must write every element, as above.
at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype);

}  // namespace cpu
}  // namespace spark_ext
