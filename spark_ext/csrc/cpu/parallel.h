// at::parallel_for for the CPU kernels, recording which threads ran tasks.
//
// Every kernel cuts its work into tasks whose boundaries depend on the shape
// alone and hands them to parallel_tasks, so results are the same bits at any
// thread count. The record (the distinct threads that ran tasks since it was
// last read, through the test-only op `spark_ext::cpu_threads_used`) lets the
// tests prove the work really spreads over threads: a library built without
// OpenMP (see OPENMP_FLAGS in spark_ext/_extension.py) silently runs
// at::parallel_for serially. Recording costs one short lock per thread per
// parallel region.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

namespace spark_ext {
namespace cpu {

// Adds the calling thread to the record.
void note_thread();

// The number of distinct threads recorded since the last call; clears the record.
int64_t take_threads_used();

// at::parallel_for(begin, end, grain, f), recording the threads that run f.
template <class F>
void parallel_tasks(int64_t begin, int64_t end, int64_t grain, const F& f) {
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    note_thread();
    f(b, e);
  });
}

}  // namespace cpu
}  // namespace spark_ext
