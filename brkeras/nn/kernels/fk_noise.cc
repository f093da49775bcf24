// The Feynman-Kac noise map of brkeras/nn/layers.py in two fused CPU kernels.
//
// Forward  z = Box-Muller(u): z[i] = sqrt(-2 log(1 - u[0, i])) cos(2 pi u[1, i]),
//          z[half + i] = ... sin(...), cut to Q * R (tf's standard_normal layout);
//          y = x + sigma * std(x) * n,  n[a, i, j] = rows[a, i] * cols[a, j] * z[i, j]
//          (flattened (a, i, j), cut to N = size(x)); also returns mean(x), var(x), z.
// Backward dx = g + c * (x - mean),  c = <g, p> / (N var),  p = sigma * std(x) * n
//          (c = 0 when var = 0, as tf.math.divide_no_nan).
//
// The uniforms u [2, half] and the signs rows [k, Q], cols [k, R] come from TF's
// random ops, so seeding stays TF's; these kernels replace the TF-op path's ~20
// elementwise passes over the tensor (the Box-Muller transform, casts, moments, the
// pooled product, x + p, the pullback) by one over the pool and 2 + 2 over x.
// Arithmetic is float32 per element with float64 sums, for float32 and bfloat16 x
// alike; the result is rounded once to x's dtype. Sums are over fixed chunks added
// in order, so the result does not depend on the number of threads.

#include <algorithm>
#include <cmath>
#include <vector>

#include "Eigen/Core"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
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
    .Input("u: float")
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
      c->set_output(3, c->Matrix(c->Dim(c->input(2), 1), c->Dim(c->input(3), 1)));
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

// z [q * r] from u [2, half] by Box-Muller, as layers.standard_normal lays it out.
static void BoxMuller(OpKernelContext* ctx, const float* u, int64_t half, int64_t qr, float* z) {
  Parallel(ctx, (half + kChunk - 1) / kChunk, kChunk * 40, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i0 = c * kChunk, len = std::min(half, i0 + kChunk) - i0;
      using Arr = Eigen::Array<float, Eigen::Dynamic, 1>;
      const Arr rad = (-2.0f * (1.0f - Eigen::Map<const Arr>(u + i0, len)).log()).sqrt();
      const Arr ang = 6.283185307179586f * Eigen::Map<const Arr>(u + half + i0, len);
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
    const Tensor &x = ctx->input(0), &u = ctx->input(1), &rows = ctx->input(2),
                 &cols = ctx->input(3);
    OP_REQUIRES(ctx, rows.dims() == 2 && cols.dims() == 2,
                InvalidArgumentError("rows and cols must be [k, Q] and [k, R]"));
    const int64_t qr = rows.dim_size(1) * cols.dim_size(1);
    OP_REQUIRES(ctx, u.dims() == 2 && u.dim_size(0) == 2 && 2 * u.dim_size(1) >= qr,
                InvalidArgumentError("u must be [2, half] uniforms with 2 * half >= Q * R"));
    Tensor *y, *mean_t, *var_t, *z;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &y));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({}), &mean_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({}), &var_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            3, TensorShape({rows.dim_size(1), cols.dim_size(1)}), &z));
    Layout l;
    OP_REQUIRES_OK(ctx, GetLayout(x, *z, rows, cols, &l));
    BoxMuller(ctx, u.flat<float>().data(), u.dim_size(1), qr, z->flat<float>().data());
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
