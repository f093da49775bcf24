// The Feynman-Kac noise map of brkeras/nn/layers.py in two fused CPU kernels.
//
// Forward  u = the [2, half] uniforms of StatelessRandomUniformV2(key, counter, Philox),
//          drawn here, bit for bit as TF's kernel draws them, but 16 counters at a time;
//          z = Box-Muller(u): z[i] = sqrt(-2 log(1 - u[0, i])) cos(2 pi u[1, i]),
//          z[half + i] = ... sin(...), cut to Q * R (tf's standard_normal layout);
//          y = x + sigma * std(x) * n,  n[a, i, j] = rows[a, i] * cols[a, j] * z[i, j]
//          (flattened (a, i, j), cut to N = size(x)); also returns mean(x), var(x), z.
// Backward dx = g + c * (x - mean),  c = <g, p> / (N var),  p = sigma * std(x) * n
//          (c = 0 when var = 0, as tf.math.divide_no_nan).
//
// The key and counter come from TF's StatelessRandomGetKeyCounter and the signs
// rows [k, Q], cols [k, R] from TF's random ops, so seeding stays TF's. TF's own
// Philox kernel is scalar code (~1.7 ns per uniform here); the lanes below
// vectorise. These kernels replace the TF-op path's ~20
// elementwise passes over the tensor (the Box-Muller transform, casts, moments, the
// pooled product, x + p, the pullback) by one over the pool and 2 + 2 over x.
// Arithmetic is float32 per element with float64 sums, for float32 and bfloat16 x
// alike; the result is rounded once to x's dtype. Sums are over fixed chunks added
// in order, so the result does not depend on the number of threads.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "Eigen/Core"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/kernels/random_ops_util.h"
#include "tensorflow/core/lib/random/philox_random.h"
#include "tensorflow/core/util/work_sharder.h"

namespace brkeras {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using absl::InvalidArgumentError;
using tensorflow::shape_inference::InferenceContext;

constexpr int64_t kChunk = 1 << 14;  // elements per partial sum

REGISTER_OP("BrkerasFkNoise")
    .Input("x: T")
    .Input("key: uint64")
    .Input("counter: uint64")
    .Input("rows: float")
    .Input("cols: float")
    .Output("y: T")
    .Output("mean: float")
    .Output("var: float")
    .Output("z: float")
    .Attr("sigma: float")
    .Attr("T: {float, bfloat16}")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(0));
      c->set_output(1, c->Scalar());
      c->set_output(2, c->Scalar());
      c->set_output(3, c->Matrix(c->Dim(c->input(3), 1), c->Dim(c->input(4), 1)));
      return absl::OkStatus();
    });

REGISTER_OP("BrkerasFkNoiseGrad")
    .Input("g: T")
    .Input("x: T")
    .Input("z: float")
    .Input("rows: float")
    .Input("cols: float")
    .Input("mean: float")
    .Input("var: float")
    .Output("dx: T")
    .Attr("sigma: float")
    .Attr("T: {float, bfloat16}")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(1));
      return absl::OkStatus();
    });

// The pool layout, checked: z [Q, R], rows [k, Q], cols [k, R], k * Q * R >= N.
struct Layout {
  int64_t k, q, r, n;
};

static absl::Status GetLayout(const Tensor& x, const Tensor& z, const Tensor& rows,
                              const Tensor& cols, Layout* l) {
  if (z.dims() != 2 || rows.dims() != 2 || cols.dims() != 2)
    return InvalidArgumentError("z, rows, cols must be [Q, R], [k, Q], [k, R]");
  l->q = z.dim_size(0);
  l->r = z.dim_size(1);
  l->k = rows.dim_size(0);
  l->n = x.NumElements();
  if (rows.dim_size(1) != l->q || cols.dim_size(0) != l->k || cols.dim_size(1) != l->r)
    return InvalidArgumentError("rows must be [k, Q] and cols [k, R] for z [Q, R]");
  if (l->k * l->q * l->r < l->n) return InvalidArgumentError("the pool k * Q * R is smaller than x");
  return absl::OkStatus();
}

// sum over e in [0, n) of f(e): kLanes float partial sums (independent, so the compiler
// vectorises them; a single accumulator is a latency chain of one add per element),
// added in float64.
constexpr int kLanes = 16;
template <typename F>
static double LaneSum(int64_t n, F f) {
  float acc[kLanes] = {0};
  int64_t e = 0;
  for (; e + kLanes <= n; e += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += f(e + l);
  double s = 0;
  for (; e < n; ++e) s += f(e);
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

static void Parallel(OpKernelContext* ctx, int64_t units, int64_t cost,
                     const std::function<void(int64_t, int64_t)>& work) {
  auto* w = ctx->device()->tensorflow_cpu_worker_threads();
  tensorflow::Shard(w->num_threads, w->workers, units, cost, work);
}

// Calls f(e0, e1, s, colrow, zrow): the elements [e0, e1) of pool row (a, i), whose
// noise is s * colrow[j] * zrow[j] for j = e - e0. Rows are split at `begin`/`end`.
template <typename F>
static void ForRows(const Layout& l, const float* z, const float* rows, const float* cols,
                    int64_t row0, int64_t row1, F f) {
  for (int64_t ai = row0; ai < row1; ++ai) {
    const int64_t a = ai / l.q, i = ai % l.q;
    const int64_t e0 = ai * l.r;
    if (e0 >= l.n) return;
    const int64_t e1 = std::min(e0 + l.r, l.n);
    f(e0, e1, rows[ai], cols + a * l.r, z + i * l.r);
  }
}

// Philox4x32-10 uniforms as TF's StatelessRandomUniformV2 (alg Philox) writes them:
// flat element e is component e % 4 of the generator skipped by e / 4 groups, mapped
// to [0, 1) by Uint32ToFloat. kPhiloxLanes counters go through the rounds together;
// the 32 x 32 -> 64-bit products vectorise (vpmuludq), where TF's loop is one counter.
constexpr int kPhiloxLanes = 16;
constexpr uint32_t kPhiloxMA = 0xD2511F53, kPhiloxMB = 0xCD9E8D57;
constexpr uint32_t kPhiloxWA = 0x9E3779B9, kPhiloxWB = 0xBB67AE85;
typedef uint32_t U32x16 __attribute__((vector_size(64)));
typedef uint64_t U64x8 __attribute__((vector_size(64)));
typedef float F32x16 __attribute__((vector_size(64)));

// (lo, hi) 32-bit halves of m * c, lane by lane: the even and odd lanes as 64-bit products.
static inline void MulHiLo(uint32_t m, U32x16 c, U32x16* lo, U32x16* hi) {
  const U64x8 w = (U64x8)c, mask = U64x8{} + 0xffffffffull;  // vector casts keep the bits
#ifdef __AVX512F__  // vpmuludq: GCC writes the generic products as vpmullq, 3x slower
  const __m512i mv = _mm512_set1_epi64(m);
  const U64x8 pe = (U64x8)_mm512_mul_epu32((__m512i)w, mv);
  const U64x8 po = (U64x8)_mm512_mul_epu32((__m512i)(w >> 32), mv);
#else
  const U64x8 pe = (w & mask) * m, po = (w >> 32) * m;
#endif
  const U64x8 l = (pe & mask) | (po << 32), h = (pe >> 32) | (po & ~mask);
  *lo = (U32x16)l;
  *hi = (U32x16)h;
}

static inline F32x16 ToUnit(U32x16 bits) {
  const U32x16 v = (bits & 0x7fffffu) | (127u << 23);
  return (F32x16)v - 1.0f;
}

static void PhiloxUniforms(const tensorflow::random::PhiloxRandom& base, int64_t first,
                           int64_t count, float* out) {
  const int64_t end = first + count;
  int64_t g = first / 4;  // the group (counter) of element `first`
  tensorflow::random::PhiloxRandom gen = base;
  gen.Skip(static_cast<uint64_t>(g));
  auto s = gen.counter();
  const uint32_t key0 = gen.key()[0], key1 = gen.key()[1];
  const U32x16 iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const U32x16 lo = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23}, hi = lo + 8;
  for (int64_t e = first; e < end; g += kPhiloxLanes) {
    // lane l holds the 128-bit counter s + l (carries as PhiloxRandom::Skip)
    U32x16 c0 = s[0] + iota;
    const U32x16 k1 = (U32x16)(c0 < s[0]) & 1u;
    U32x16 c1 = s[1] + k1;
    const U32x16 k2 = k1 & ((U32x16)(c1 == 0u) & 1u);
    U32x16 c2 = s[2] + k2;
    U32x16 c3 = s[3] + (k2 & ((U32x16)(c2 == 0u) & 1u));
    uint32_t r0 = key0, r1 = key1;
    for (int round = 0; round < 10; ++round) {
      U32x16 lo0, hi0, lo1, hi1;
      MulHiLo(kPhiloxMA, c0, &lo0, &hi0);
      MulHiLo(kPhiloxMB, c2, &lo1, &hi1);
      c0 = hi1 ^ c1 ^ r0;
      c1 = lo1;
      c2 = hi0 ^ c3 ^ r1;
      c3 = lo0;
      r0 += kPhiloxWA;
      r1 += kPhiloxWB;
    }
    // Transpose: counter l's four outputs are elements 4l .. 4l + 3 of the block.
    const F32x16 f0 = ToUnit(c0), f1 = ToUnit(c1), f2 = ToUnit(c2), f3 = ToUnit(c3);
    const F32x16 t0 = __builtin_shuffle(f0, f2, lo), t1 = __builtin_shuffle(f0, f2, hi);
    const F32x16 t2 = __builtin_shuffle(f1, f3, lo), t3 = __builtin_shuffle(f1, f3, hi);
    const F32x16 buf[4] = {__builtin_shuffle(t0, t2, lo), __builtin_shuffle(t0, t2, hi),
                           __builtin_shuffle(t1, t3, lo), __builtin_shuffle(t1, t3, hi)};
    const int64_t take = std::min(end, 4 * g + 4 * kPhiloxLanes) - e;
    std::memcpy(out + (e - first), reinterpret_cast<const float*>(buf) + (e - 4 * g),
                take * sizeof(float));
    e += take;
    gen.Skip(kPhiloxLanes);
    s = gen.counter();
  }
}

// z [q * r] by Box-Muller from the uniforms [2, half] of `gen`, as
// layers.standard_normal lays it out.
static void BoxMuller(OpKernelContext* ctx, const tensorflow::random::PhiloxRandom& gen,
                      int64_t half, int64_t qr, float* z) {
  Parallel(ctx, (half + kChunk - 1) / kChunk, kChunk * 60, [&](int64_t c0, int64_t c1) {
    // scratch for one chunk's uniforms, overwritten before use (no zero fill)
    std::unique_ptr<float[]> u0(new float[kChunk]), u1(new float[kChunk]);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i0 = c * kChunk, len = std::min(half, i0 + kChunk) - i0;
      PhiloxUniforms(gen, i0, len, u0.get());
      PhiloxUniforms(gen, half + i0, len, u1.get());
      using Arr = Eigen::Array<float, Eigen::Dynamic, 1>;
      const Arr rad = (-2.0f * (1.0f - Eigen::Map<const Arr>(u0.get(), len)).log()).sqrt();
      const Arr ang = 6.283185307179586f * Eigen::Map<const Arr>(u1.get(), len);
      const int64_t n_cos = std::min(len, qr - i0), n_sin = std::min(len, qr - half - i0);
      if (n_cos > 0) Eigen::Map<Arr>(z + i0, n_cos) = rad.head(n_cos) * ang.head(n_cos).cos();
      if (n_sin > 0)
        Eigen::Map<Arr>(z + half + i0, n_sin) = rad.head(n_sin) * ang.head(n_sin).sin();
    }
  });
}

// Both kernels: the sigma attribute.
class SigmaKernel : public OpKernel {
 public:
  explicit SigmaKernel(OpKernelConstruction* c) : OpKernel(c) {
    OP_REQUIRES_OK(c, c->GetAttr("sigma", &sigma_));
  }

 protected:
  float sigma_;
};

template <typename T>
class FkNoiseOp : public SigmaKernel {
 public:
  using SigmaKernel::SigmaKernel;

  void Compute(OpKernelContext* ctx) override {
    const Tensor &x = ctx->input(0), &key = ctx->input(1), &counter = ctx->input(2),
                 &rows = ctx->input(3), &cols = ctx->input(4);
    OP_REQUIRES(ctx, rows.dims() == 2 && cols.dims() == 2,
                InvalidArgumentError("rows and cols must be [k, Q] and [k, R]"));
    OP_REQUIRES(ctx, key.NumElements() == 1 && counter.NumElements() == 2,
                InvalidArgumentError("key and counter must be Philox's [1] and [2] uint64 "
                                     "(tf.raw_ops.StatelessRandomGetKeyCounter)"));
    const int64_t qr = rows.dim_size(1) * cols.dim_size(1);
    Tensor *y, *mean_t, *var_t, *z;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &y));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({}), &mean_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({}), &var_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            3, TensorShape({rows.dim_size(1), cols.dim_size(1)}), &z));
    Layout l;
    OP_REQUIRES_OK(ctx, GetLayout(x, *z, rows, cols, &l));
    const auto gen = tensorflow::GetPhiloxRandomFromCounterKeyMem(
        counter.flat<tensorflow::uint64>().data(), key.flat<tensorflow::uint64>().data());
    BoxMuller(ctx, gen, (qr + 1) / 2, qr, z->flat<float>().data());
    const T* xp = x.flat<T>().data();
    T* yp = y->flat<T>().data();
    const int64_t n = l.n;
    if (n == 0) {
      mean_t->scalar<float>()() = NAN;
      var_t->scalar<float>()() = NAN;
      return;
    }
    // Moments: per chunk, its mean and sum of squared deviations (two passes over
    // a chunk that stays in cache), combined in order by Chan et al.'s formula.
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    auto chunk_len = [n](int64_t c) { return std::min(n, (c + 1) * kChunk) - c * kChunk; };
    std::vector<double> csum(chunks), cm2(chunks);
    Parallel(ctx, chunks, kChunk * 4, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const T* xc = xp + c * kChunk;
        const int64_t len = chunk_len(c);
        const double s = LaneSum(len, [&](int64_t e) { return static_cast<float>(xc[e]); });
        const float m = static_cast<float>(s / len);
        // deviations from the chunk's own mean: no cancellation whatever the mean; the
        // rounding of m adds len * (mean - m)^2, removed exactly below.
        const double dm = s / len - m;
        double m2 = LaneSum(len, [&](int64_t e) {
          const float d = static_cast<float>(xc[e]) - m;
          return d * d;
        });
        csum[c] = s;
        cm2[c] = std::max(0.0, m2 - len * dm * dm);
      }
    });
    double count = 0, mean = 0, m2 = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      const double nc = chunk_len(c);
      const double mc = csum[c] / nc, delta = mc - mean, tot = count + nc;
      m2 += cm2[c] + delta * delta * count * nc / tot;
      mean += delta * nc / tot;
      count = tot;
    }
    const float meanf = static_cast<float>(mean), varf = static_cast<float>(m2 / n);
    mean_t->scalar<float>()() = meanf;
    var_t->scalar<float>()() = varf;
    const float scale = sigma_ * std::sqrt(varf);
    const float *zp = z->flat<float>().data(), *rp = rows.flat<float>().data(),
                *cp = cols.flat<float>().data();
    Parallel(ctx, l.k * l.q, l.r * 6, [&](int64_t r0, int64_t r1) {
      ForRows(l, zp, rp, cp, r0, r1,
              [&](int64_t e0, int64_t e1, float s, const float* col, const float* zr) {
                const float ss = scale * s;
                for (int64_t e = e0; e < e1; ++e) {
                  const int64_t j = e - e0;
                  yp[e] = static_cast<T>(static_cast<float>(xp[e]) + ss * col[j] * zr[j]);
                }
              });
    });
  }
};

template <typename T>
class FkNoiseGradOp : public SigmaKernel {
 public:
  using SigmaKernel::SigmaKernel;

  void Compute(OpKernelContext* ctx) override {
    const Tensor &g = ctx->input(0), &x = ctx->input(1), &z = ctx->input(2),
                 &rows = ctx->input(3), &cols = ctx->input(4);
    OP_REQUIRES(ctx, g.shape() == x.shape(), InvalidArgumentError("g and x differ in shape"));
    Layout l;
    OP_REQUIRES_OK(ctx, GetLayout(x, z, rows, cols, &l));
    const float mean = ctx->input(5).scalar<float>()(), var = ctx->input(6).scalar<float>()();
    Tensor* dx;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &dx));
    const T *gp = g.flat<T>().data(), *xp = x.flat<T>().data();
    T* dp = dx->flat<T>().data();
    const float *zp = z.flat<float>().data(), *rp = rows.flat<float>().data(),
                *cp = cols.flat<float>().data();
    const int64_t n = l.n, nrows = l.k * l.q;
    // <g, n> by pool row, then in order.
    std::vector<double> part(nrows, 0.0);
    Parallel(ctx, nrows, l.r * 4, [&](int64_t r0, int64_t r1) {
      ForRows(l, zp, rp, cp, r0, r1,
              [&](int64_t e0, int64_t e1, float s, const float* col, const float* zr) {
                const T* gr = gp + e0;
                part[e0 / l.r] = s * LaneSum(e1 - e0, [&](int64_t j) {
                  return static_cast<float>(gr[j]) * col[j] * zr[j];
                });
              });
    });
    double dot = 0;
    for (double v : part) dot += v;
    // c = <g, p> / (N var) with p = sigma std n; divide_no_nan: 0 when var = 0.
    const double denom = static_cast<double>(n) * var;
    const float c = denom == 0 ? 0.0f
                               : static_cast<float>(sigma_ * std::sqrt(static_cast<double>(var)) *
                                                    dot / denom);
    Parallel(ctx, (n + kChunk - 1) / kChunk, kChunk * 4, [&](int64_t c0, int64_t c1) {
      const int64_t e1 = std::min(n, c1 * kChunk);
      for (int64_t e = c0 * kChunk; e < e1; ++e)
        dp[e] = static_cast<T>(static_cast<float>(gp[e]) +
                               c * (static_cast<float>(xp[e]) - mean));
    });
  }
};

#define REGISTER(T)                                                                      \
  REGISTER_KERNEL_BUILDER(                                                               \
      Name("BrkerasFkNoise").Device(DEVICE_CPU).TypeConstraint<T>("T"), FkNoiseOp<T>);   \
  REGISTER_KERNEL_BUILDER(                                                               \
      Name("BrkerasFkNoiseGrad").Device(DEVICE_CPU).TypeConstraint<T>("T"), FkNoiseGradOp<T>);

REGISTER(float);
REGISTER(tensorflow::bfloat16);

}  // namespace brkeras
