// Instantiates the element loops of span_impl.h once per instruction set and
// picks the best one at run time. GCC compiles each copy under its own
// `#pragma GCC target`, so one binary runs everywhere and still uses AVX2 /
// AVX-512 where present. The copies compute identical bits: the math is
// written lane by lane in float32 with no fused multiply-add (-ffp-contract=off)
// and the reduction lanes do not depend on the vector width.
//
// Only c10's Half/BFloat16 and <immintrin.h> are included, before any target
// pragma, so no inline function from outside is ever emitted with AVX flags.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "span_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPARK_MULTI_ISA 1
#include <immintrin.h>
#endif

namespace spark_ext {
namespace cpu {

namespace isa_default {
#define SPARK_ISA_NAME "default"
#include "kd_row_impl.h"
#include "span_impl.h"
#undef SPARK_ISA_NAME
}  // namespace isa_default

#if SPARK_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx2,f16c,popcnt")
namespace isa_avx2 {
#define SPARK_ISA_AVX2 1
#define SPARK_ISA_NAME "avx2"
#include "kd_row_impl.h"
#include "span_impl.h"
#undef SPARK_ISA_NAME
#undef SPARK_ISA_AVX2
}  // namespace isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c,popcnt")
namespace isa_avx512 {
#define SPARK_ISA_AVX512 1
#define SPARK_ISA_NAME "avx512"
#include "kd_row_impl.h"
#include "span_impl.h"
#undef SPARK_ISA_NAME
#undef SPARK_ISA_AVX512
}  // namespace isa_avx512
#pragma GCC pop_options
#endif

// SPARK_EXT_CPU_ISA=default|avx2|avx512 caps the choice (tests use it to check
// that every variant gives the same bits); unknown or unsupported values are ignored.
static const KernelTable& choose() {
  const char* cap = std::getenv("SPARK_EXT_CPU_ISA");
  if (cap != nullptr && std::strcmp(cap, "default") == 0) return isa_default::table;
#if SPARK_MULTI_ISA
  __builtin_cpu_init();
  const bool want_avx2_at_most = cap != nullptr && std::strcmp(cap, "avx2") == 0;
  if (!want_avx2_at_most && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return isa_avx512::table;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) {
    return isa_avx2::table;
  }
#endif
  return isa_default::table;
}

const KernelTable& kernels() {
  static const KernelTable& t = choose();
  return t;
}

}  // namespace cpu
}  // namespace spark_ext
