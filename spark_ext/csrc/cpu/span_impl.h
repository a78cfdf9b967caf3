// Element loops of the fake-quantization ops. Included several times by
// span_kernels.cpp, each time inside its own namespace and target pragma
// (SPARK_ISA_* says which), so this file has no include guard and includes
// nothing itself.
//
// The math is written once as templates over V = float (tails) or vf, a
// 16-lane GCC vector (one AVX-512 register, two AVX2 or four SSE registers).
// Every operation is an IEEE float32 operation applied lane by lane in the
// order the reference / ATen evaluates it, so every ISA and the scalar tail
// give the same bits. Compile with -ffp-contract=off (no fused multiply-add).
//
// Rounding uses the 1.5 * 2^23 trick ((v + M) - M rounds half to even in the
// default rounding mode), exact for |v| <= 2^22. The operands are clamped
// into range first, which leaves the results unchanged: LSQ clamps before
// rounding anyway, and for §5a a value beyond quant_min - 1 / quant_max + 1
// rounds to something outside [quant_min, quant_max] either way. This needs
// |quant_min|, |quant_max| <= 2^21 (checked by the ops).

typedef float vf __attribute__((vector_size(4 * kLanes)));
typedef int32_t vi __attribute__((vector_size(4 * kLanes)));
typedef uint32_t vu __attribute__((vector_size(4 * kLanes)));
typedef uint16_t vh __attribute__((vector_size(2 * kLanes)));

template <class V> static inline V splat(float s);
template <> inline float splat<float>(float s) { return s; }
template <> inline vf splat<vf>(float s) { return vf{} + s; }

static inline float sel(bool m, float a, float b) { return m ? a : b; }
static inline float sel(int m, float a, float b) { return m ? a : b; }
static inline vf sel(vi m, vf a, vf b) { return m ? a : b; }

template <class V> static inline V clampv(V v, V lo, V hi) {
  // torch.clamp's order (lower bound first); NaN passes through.
  v = sel(v < lo, lo, v);
  return sel(v > hi, hi, v);
}

// x * a + c rounded once to float32, like the fused multiply-add ATen's
// learnable backward gets from its compilers (AVX2 build, nvcc) for
// nearbyint(zp + x * inv_scale): the product of two floats is exact in double
// and so, in any sane range, is the sum; one rounding to float follows.
typedef double vd __attribute__((vector_size(8 * kLanes)));
static inline float fused_mul_add(float x, float a, float c) { return float(double(x) * double(a) + double(c)); }
static inline vf fused_mul_add(vf x, vf a, vf c) {
  const vd r = __builtin_convertvector(x, vd) * __builtin_convertvector(a, vd) + __builtin_convertvector(c, vd);
  return __builtin_convertvector(r, vf);
}

template <class V> static inline V round_half_even(V v) {
  const V m = splat<V>(12582912.0f);  // 1.5 * 2^23
  return (v + m) - m;
}

// ---- loads and stores: 16 elements at a time, or one -------------------

static inline float f_from_bits(uint32_t b) { float f; __builtin_memcpy(&f, &b, 4); return f; }
static inline uint32_t bits_from_f(float f) { uint32_t b; __builtin_memcpy(&b, &f, 4); return b; }

// float -> bfloat16 rounds to nearest even and keeps NaN a NaN, like c10::BFloat16.
static inline uint16_t f_to_bf16(float f) {
  uint32_t u = bits_from_f(f);
  return f != f ? uint16_t(0x7FC0) : uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline float load1(const float* p) { return *p; }
static inline float load1(const c10::BFloat16* p) { return f_from_bits(uint32_t(p->x) << 16); }
static inline float load1(const c10::Half* p) { return static_cast<float>(*p); }
static inline void store1(float* p, float v) { *p = v; }
static inline void store1(c10::BFloat16* p, float v) { p->x = f_to_bf16(v); }
static inline void store1(c10::Half* p, float v) { *p = c10::Half(v); }

static inline vf loadv(const float* p) { vf v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline void storev(float* p, vf v) { __builtin_memcpy(p, &v, sizeof v); }

static inline vf loadv(const c10::BFloat16* p) {
  vh h;
  __builtin_memcpy(&h, p, sizeof h);
  vu u = __builtin_convertvector(h, vu) << 16;
  vf v;
  __builtin_memcpy(&v, &u, sizeof v);
  return v;
}
static inline void storev(c10::BFloat16* p, vf v) {
  vu u;
  __builtin_memcpy(&u, &v, sizeof u);
  vu r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  r = (v != v) ? vu{} + 0x7FC0u : r;
  vh h = __builtin_convertvector(r, vh);
  __builtin_memcpy(p, &h, sizeof h);
}

#if defined(SPARK_ISA_AVX512)
static inline vf loadv(const c10::Half* p) {
  return (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
static inline void storev(c10::Half* p, vf v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#elif defined(SPARK_ISA_AVX2)
static inline vf loadv(const c10::Half* p) {
  const __m128i* q = reinterpret_cast<const __m128i*>(p);
  float t[kLanes];
  _mm256_storeu_ps(t, _mm256_cvtph_ps(_mm_loadu_si128(q)));
  _mm256_storeu_ps(t + 8, _mm256_cvtph_ps(_mm_loadu_si128(q + 1)));
  return loadv(t);
}
static inline void storev(c10::Half* p, vf v) {
  float t[kLanes];
  storev(t, v);
  __m128i* q = reinterpret_cast<__m128i*>(p);
  _mm_storeu_si128(q, _mm256_cvtps_ph(_mm256_loadu_ps(t), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  _mm_storeu_si128(q + 1, _mm256_cvtps_ph(_mm256_loadu_ps(t + 8), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#else
static inline vf loadv(const c10::Half* p) {
  float t[kLanes];
  for (int j = 0; j < kLanes; ++j) t[j] = static_cast<float>(p[j]);
  return loadv(t);
}
static inline void storev(c10::Half* p, vf v) {
  float t[kLanes];
  storev(t, v);
  for (int j = 0; j < kLanes; ++j) p[j] = c10::Half(t[j]);
}
#endif

// ---- the math -----------------------------------------------------------

template <class V> struct Grads {
  V dx;      // input gradient
  V dscale;  // scale (§5a) or step (§5b) term
  V dzero;   // zero-point (§5a) or offset (§5b) term
};

// Each op's math holds its SpanArgs parameters and reads them in three ways:
// coeffs_at(k) gives element k's values (k = 0 in the broadcast variant),
// splat_coeffs() the span's one value in all 16 lanes, load_coeffs(i) the
// per-element values of elements [i, i + 16). fwd/bwd are forced inline: GCC
// would otherwise call FqMath::bwd once per 16 elements (about 20 % slower).

// docs/spec.md §5a, ATen's formulas.
struct FqMath {
  FqParams p;
  template <class V> struct Coeffs {
    V inv_scale, scale, zero_point;
  };
  Coeffs<float> coeffs_at(int64_t k) const { return {p.inv_scale[k], p.scale[k], p.zero_point[k]}; }
  Coeffs<vf> splat_coeffs() const {
    return {splat<vf>(p.inv_scale[0]), splat<vf>(p.scale[0]), splat<vf>(p.zero_point[0])};
  }
  Coeffs<vf> load_coeffs(int64_t i) const {
    return {loadv(p.inv_scale + i), loadv(p.scale + i), loadv(p.zero_point + i)};
  }

  template <class V> [[gnu::always_inline]] inline V fwd(V x, const Coeffs<V>& k) const {
    const V L = splat<V>(p.quant_min), H = splat<V>(p.quant_max), zp = k.zero_point;
    // ATen: clamp(zp + nearbyint(x * inv_scale), quant_min, quant_max); the
    // inner clamp only keeps the rounding trick in range (see the top).
    V r = round_half_even(clampv(x * k.inv_scale, L - zp - splat<V>(1.f), H - zp + splat<V>(1.f)));
    V q = clampv(r + zp, L, H);
    return (q - zp) * k.scale;
  }
  template <class V> [[gnu::always_inline]] inline Grads<V> bwd(V x, V dy, const Coeffs<V>& k) const {
    const V L = splat<V>(p.quant_min), H = splat<V>(p.quant_max), one = splat<V>(1.f), zero = splat<V>(0.f);
    const V zp = k.zero_point;
    // ATen's backward rounds zp + x * inv_scale (zp added before rounding,
    // product and sum fused).
    V xq = round_half_even(clampv(fused_mul_add(x, k.inv_scale, zp), L - one, H + one));
    auto inside = (xq >= L) & (H >= xq);
    // ATen's xfq = (xq - zp) * scale; ... (xfq - x), contracted the same way:
    // (xq - zp) * scale - x rounded once (exact in double: x is within a step
    // of the product, see fused_mul_add).
    V xfq_minus_x = fused_mul_add(clampv(xq, L, H) - zp, k.scale, -x);
    V g = splat<V>(p.grad_factor);
    V dscale_in = dy * xfq_minus_x * k.inv_scale * g;
    V dscale_out = dy * sel(xq < L, L - zp, H - zp) * g;
    V dzero_out = dy * splat<V>(-1.f) * k.scale * g;
    return {dy * sel(inside, one, zero), sel(inside, dscale_in, dscale_out), sel(inside, zero, dzero_out)};
  }
};

// docs/spec.md §5b.
struct LsqMath {
  LsqParams p;
  template <class V> struct Coeffs {
    V step, offset;
  };
  Coeffs<float> coeffs_at(int64_t k) const { return {p.step[k], p.offset[k]}; }
  Coeffs<vf> splat_coeffs() const { return {splat<vf>(p.step[0]), splat<vf>(p.offset[0])}; }
  Coeffs<vf> load_coeffs(int64_t i) const { return {loadv(p.step + i), loadv(p.offset + i)}; }

  template <class V> [[gnu::always_inline]] inline V fwd(V x, const Coeffs<V>& k) const {
    V v = (x - k.offset) / k.step;
    V q = round_half_even(clampv(v, splat<V>(p.neg_qn), splat<V>(p.qp)));
    return q * k.step + k.offset;
  }
  template <class V> [[gnu::always_inline]] inline Grads<V> bwd(V x, V dy, const Coeffs<V>& k) const {
    const V L = splat<V>(p.neg_qn), H = splat<V>(p.qp), one = splat<V>(1.f), zero = splat<V>(0.f);
    V v = (x - k.offset) / k.step;
    V q = round_half_even(clampv(v, L, H));
    auto inside = (v >= L) & (H >= v);
    V dstep = sel(inside, q - v, sel(v < L, L, H));
    return {dy * sel(inside, one, zero), dy * dstep, dy * sel(inside, zero, one)};
  }
};

// ---- span drivers ---------------------------------------------------------
// PE: per-element parameters (period mode), else one value for the span.

template <class T, bool PE, class M>
static void fwd_span(const SpanArgs<decltype(M::p)>& g, const M m) {
  const T* x = static_cast<const T*>(g.x);
  T* y = static_cast<T*>(g.out);
  const auto k0 = m.splat_coeffs();
  const int64_t n = g.n;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    vf r;
    if constexpr (PE) {
      r = m.fwd(loadv(x + i), m.load_coeffs(i));
    } else {
      r = m.fwd(loadv(x + i), k0);
    }
    storev(y + i, r);
  }
  for (; i < n; ++i) {
    store1(y + i, m.fwd(load1(x + i), m.coeffs_at(PE ? i : 0)));
  }
}

// DY_BCAST: one dy value for the whole span (dy_stride 0, e.g. the gradient of
// y.sum()), else n contiguous values (dy_stride 1). Same arithmetic either way.
template <class T, bool PE, bool DY_BCAST, class M>
static void bwd_loop(const SpanArgs<decltype(M::p)>& g, const M m) {
  const T* x = static_cast<const T*>(g.x);
  const T* dy = static_cast<const T*>(g.dy);
  T* dx = static_cast<T*>(g.out);
  const auto k0 = m.splat_coeffs();
  const float dy0 = load1(dy);
  const vf dyv0 = splat<vf>(dy0);
  const int64_t n = g.n;
  // Broadcast variant: 16 lane accumulators kept in registers.
  vf lane_scale = loadv(g.acc_scale), lane_zero = loadv(g.acc_zero);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    Grads<vf> r;
    const vf dyv = DY_BCAST ? dyv0 : loadv(dy + i);
    if constexpr (PE) {
      r = m.bwd(loadv(x + i), dyv, m.load_coeffs(i));
      storev(g.acc_scale + i, loadv(g.acc_scale + i) + r.dscale);
      storev(g.acc_zero + i, loadv(g.acc_zero + i) + r.dzero);
    } else {
      r = m.bwd(loadv(x + i), dyv, k0);
      lane_scale += r.dscale;
      lane_zero += r.dzero;
    }
    storev(dx + i, r.dx);
  }
  if constexpr (!PE) {
    storev(g.acc_scale, lane_scale);
    storev(g.acc_zero, lane_zero);
  }
  for (; i < n; ++i) {
    Grads<float> r = m.bwd(load1(x + i), DY_BCAST ? dy0 : load1(dy + i), m.coeffs_at(PE ? i : 0));
    store1(dx + i, r.dx);
    const int64_t lane = PE ? i : (i % kLanes);
    g.acc_scale[lane] += r.dscale;
    g.acc_zero[lane] += r.dzero;
  }
}

template <class T, bool PE, class M>
static void bwd_span(const SpanArgs<decltype(M::p)>& g, const M m) {
  if (g.dy_stride == 0) {
    bwd_loop<T, PE, true>(g, m);
  } else {
    bwd_loop<T, PE, false>(g, m);
  }
}

template <class T, bool PE> static void fq_fwd(const SpanArgs<FqParams>& g) { fwd_span<T, PE>(g, FqMath{g.params}); }
template <class T, bool PE> static void fq_bwd(const SpanArgs<FqParams>& g) { bwd_span<T, PE>(g, FqMath{g.params}); }
template <class T, bool PE> static void lsq_fwd(const SpanArgs<LsqParams>& g) { fwd_span<T, PE>(g, LsqMath{g.params}); }
template <class T, bool PE> static void lsq_bwd(const SpanArgs<LsqParams>& g) { bwd_span<T, PE>(g, LsqMath{g.params}); }

#define SPARK_ROW(fn)                                                                               \
  {{fn<float, false>, fn<float, true>}, {fn<c10::Half, false>, fn<c10::Half, true>},                \
   {fn<c10::BFloat16, false>, fn<c10::BFloat16, true>}}

static const KernelTable table = {SPARK_ROW(fq_fwd), SPARK_ROW(fq_bwd), SPARK_ROW(lsq_fwd), SPARK_ROW(lsq_bwd),
                                  {kd_fwd_row<0>, kd_fwd_row<1>, kd_fwd_row<2>},
                                  {kd_bwd_row<0>, kd_bwd_row<1>, kd_bwd_row<2>},
                                  SPARK_ISA_NAME};
#undef SPARK_ROW
