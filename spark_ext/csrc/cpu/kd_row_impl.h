// Element loops of the weighted KD loss (weighted_kd_cpu.cpp, docs/spec.md §3)
// over contiguous float32 rows. Included by span_kernels.cpp once per
// instruction set, inside its namespace and target pragma, right before
// span_impl.h (whose vf / vi / vu types, sel and kLanes it shares), so this
// file has no include guard and includes nothing itself.
//
// Every operation is an IEEE float32 (or float64) operation applied lane by
// lane, with the lane of element i fixed to i mod 16 (the scalar tail uses the
// same lanes), so every ISA gives the same bits. Built with -ffp-contract=off.

typedef float kd_vf __attribute__((vector_size(4 * kLanes)));
typedef int32_t kd_vi __attribute__((vector_size(4 * kLanes)));
typedef uint32_t kd_vu __attribute__((vector_size(4 * kLanes)));
typedef double kd_vd __attribute__((vector_size(8 * kLanes)));

static inline kd_vf kd_load(const float* p) { kd_vf v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline void kd_store(float* p, kd_vf v) { __builtin_memcpy(p, &v, sizeof v); }
static inline kd_vd kd_loadd(const double* p) { kd_vd v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline void kd_stored(double* p, kd_vd v) { __builtin_memcpy(p, &v, sizeof v); }

// Correctly rounded square root (IEEE), so equal to std::sqrt lane by lane.
static inline kd_vf kd_sqrt(kd_vf x) {
#if defined(SPARK_ISA_AVX512)
  __m512 r;
  __builtin_memcpy(&r, &x, sizeof r);
  r = _mm512_sqrt_ps(r);
  __builtin_memcpy(&x, &r, sizeof r);
#elif defined(SPARK_MULTI_ISA) && defined(SPARK_ISA_AVX2)
  __m256 r[2];
  __builtin_memcpy(r, &x, sizeof r);
  r[0] = _mm256_sqrt_ps(r[0]);
  r[1] = _mm256_sqrt_ps(r[1]);
  __builtin_memcpy(&x, r, sizeof r);
#elif defined(SPARK_MULTI_ISA)
  __m128 r[4];
  __builtin_memcpy(r, &x, sizeof r);
  for (int k = 0; k < 4; ++k) r[k] = _mm_sqrt_ps(r[k]);
  __builtin_memcpy(&x, r, sizeof r);
#else
  for (int k = 0; k < kLanes; ++k) x[k] = __builtin_sqrtf(x[k]);
#endif
  return x;
}
static inline float kd_sqrt(float x) { return __builtin_sqrtf(x); }

static inline float kd_abs(float d) { return __builtin_fabsf(d); }
static inline kd_vf kd_abs(kd_vf d) {
  kd_vu u;
  __builtin_memcpy(&u, &d, sizeof u);
  u &= 0x7FFFFFFFu;
  __builtin_memcpy(&d, &u, sizeof d);
  return d;
}
static inline float kd_sel(bool m, float a, float b) { return m ? a : b; }
static inline kd_vf kd_sel(kd_vi m, kd_vf a, kd_vf b) { return m ? a : b; }

// docs/spec.md §2 (image_rows.h ell / ell_grad, same float32 operations): K = 0 l1, 1 l2, 2 charbonnier.
constexpr float kKdEps = static_cast<float>(1e-3);
constexpr float kKdEps2 = static_cast<float>(1e-3 * 1e-3);

template <int K, class V> static inline V kd_ell(V d) {
  if constexpr (K == 0) return kd_abs(d);
  else if constexpr (K == 1) return d * d;
  else return kd_sqrt(d * d + kKdEps2) - kKdEps;
}
// sign(d) with 0 at 0 (and at NaN), 2d, d / sqrt(d^2 + eps^2).
template <int K, class V> static inline V kd_ell_grad(V d) {
  if constexpr (K == 0) {
    const V one = V{} + 1.f, zero = V{};
    return kd_sel(d > zero, one, zero) - kd_sel(d < zero, one, zero);
  } else if constexpr (K == 1) {
    return 2.f * d;
  } else {
    return d / kd_sqrt(d * d + kKdEps2);
  }
}

// Forward: lane l of acc (16 doubles) += the row's sum of w[i] * ell(s[i] - t[i])
// (w == nullptr: weight 1) over i = l mod 16, summed in float32 lanes over
// blocks of 256 elements (16 per lane, in order of i), each block's lane sums
// then added to acc in float64.
template <int K>
static void kd_fwd_row(const KdRowArgs& a) {
  const int64_t n = a.n;
  constexpr int64_t kBlock = 16 * kLanes;
  kd_vd acc = kd_loadd(a.acc);
  int64_t i = 0;
  while (i < n) {
    const int64_t end = n - i >= kBlock ? i + kBlock : n;
    kd_vf part = kd_vf{};
    for (; i + kLanes <= end; i += kLanes) {
      const kd_vf e = kd_ell<K>(kd_load(a.s + i) - kd_load(a.t + i));
      part += a.w ? kd_load(a.w + i) * e : e;
    }
    for (int64_t l = 0; i < end; ++i, ++l) {
      const float e = kd_ell<K>(a.s[i] - a.t[i]);
      part[l] += a.w ? a.w[i] * e : e;
    }
    acc += __builtin_convertvector(part, kd_vd);
  }
  kd_stored(a.acc, acc);
}

// Backward: v = (scale * w) * ell'(s - t) (w == nullptr: scale * ell'(s - t));
// out_s = v and out_t = -v where given; acc[i] += double(ell(s[i] - t[i])) where given.
template <int K>
static void kd_bwd_row(const KdRowArgs& a) {
  const int64_t n = a.n;
  const float scale = a.scale;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const kd_vf d = kd_load(a.s + i) - kd_load(a.t + i);
    if (a.out_s || a.out_t) {
      const kd_vf g = kd_ell_grad<K>(d);
      const kd_vf v = a.w ? (scale * kd_load(a.w + i)) * g : scale * g;
      if (a.out_s) kd_store(a.out_s + i, v);
      if (a.out_t) kd_store(a.out_t + i, -1.f * v);
    }
    if (a.acc) kd_stored(a.acc + i, kd_loadd(a.acc + i) + __builtin_convertvector(kd_ell<K>(d), kd_vd));
  }
  for (; i < n; ++i) {
    const float d = a.s[i] - a.t[i];
    if (a.out_s || a.out_t) {
      const float g = kd_ell_grad<K>(d);
      const float v = a.w ? (scale * a.w[i]) * g : scale * g;
      if (a.out_s) a.out_s[i] = v;
      if (a.out_t) a.out_t[i] = -1.f * v;
    }
    if (a.acc) a.acc[i] += static_cast<double>(kd_ell<K>(d));
  }
}
