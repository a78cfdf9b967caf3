// Output tensors of the CPU kernels backed by transparent huge pages.
//
// A freshly allocated large output is written once by a kernel; with 4 KiB
// pages every page costs a fault that zeroes it (8192 faults for a 32 MiB
// output), and that, not the kernel, was most of an op's time. With
// MADV_HUGEPAGE the kernel maps 2 MiB pages instead (512x fewer faults), when
// /sys/kernel/mm/transparent_hugepage/enabled is `always` or `madvise`. Under
// `never` the advice is ignored: outputs are then only slower, never wrong.
//
// Outputs of at least huge_page_threshold() bytes (32 MiB: below it glibc
// reuses freed blocks without faults) come 2 MiB-aligned from posix_memalign
// with that advice; smaller ones, and all of them off Linux or with
// SPARK_EXT_HUGE_PAGES=0, come from c10::GetCPUAllocator(). The tensors are
// ordinary resizable CPU tensors (their storage keeps this allocator).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace spark_ext {
namespace cpu {

// Smallest output, in bytes, that gets huge pages; 0 when the path is off.
int64_t huge_page_threshold();

// Test-only: sets the threshold (0 turns the path off); returns the previous one.
int64_t set_huge_page_threshold(int64_t bytes);

// Test-only: how many outputs took the huge-page path since the last call; clears the count.
int64_t take_huge_page_allocations();

// at::empty_like(like) (default options: like's dtype, strides kept as empty_like keeps them).
at::Tensor empty_output_like(const at::Tensor& like);

// at::empty(sizes, dtype) on the CPU, contiguous.
at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype);

}  // namespace cpu
}  // namespace spark_ext
