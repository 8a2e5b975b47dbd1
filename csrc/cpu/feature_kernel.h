// Feature-matching losses on the CPU (hint, attention transfer): loss and gradient in one call,
// generic over the vector type.
//
// Included (through kernels.h) by isa_{avx512,avx2,scalar}.cpp inside namespace fastkd::<isa>,
// after the matching vec_*.h; the same algorithm is thereby compiled once per instruction set.
//
// hint_forward, per row (sample) of D entries, s = student, t = teacher, e = s - t:
//   mse        sum e^2                         grad 2e
//   l1         sum |e|                         grad sign(e)   (sign(NaN) = 0, as torch.sign)
//   smooth_l1  sum (|e| < 1 ? e^2/2 : |e|-1/2) grad clamp(e, -1, 1)                 (beta = 1)
//     one sweep; a long row is split into chunks that run as separate tasks.
//   cosine     1 - cos,  cos = <s,t> / (Ns Nt),  Ns = max(|s|, 1e-8), Nt = max(|t|, 1e-8)
//              grad = -t / (Ns Nt) + cos * s / (Ns |s|)    (second term 0 when |s| = 0)
//                   = -v / Ns + cos * u / |s|             (u = s / Ns, v = t / Nt)
//     (exactly F.cosine_similarity's value and gradient: it clamps the norms without recording
//     the clamp, so the norm's own gradient s/|s| still flows where |s| < eps)
//   normalized_mse  sum (u - v)^2,  u = s / Ns, v = t / Nt,  Ns = max(|s|, 1e-12), Nt likewise
//              grad = 2/Ns * (r - [|s| >= 1e-12] u <u, r>),  r = u - v      (F.normalize's)
//     two sweeps over the row: (1) |s|^2, |t|^2, <s,t>; (2) the loss, summed entry by entry as
//     the reference does (1 - cos = |u - v|^2 / 2 for unclamped norms: no cancellation when
//     cos is near 1), and the gradient, a u + b v. The row (2 x D entries) is re-read from cache.
//   Memory traffic: read 2 N*D, write N*D (gradient).
//
// attention_transfer_forward, per sample with x = student [Cs, HW], y = teacher [Ct, HW]:
//   Qs[j] = mean_c |x[c,j]|^p, Qt likewise; a_s = Qs / max(|Qs|, 1e-12), a_t likewise;
//   row loss = sum_j (a_s - a_t)^2;
//   dQs = 2/Ns (r - [|Qs| >= 1e-12] a_s <a_s, r>),  r = a_s - a_t;
//   grad[c,j] = dQs[j] * p/Cs * |x|^(p-1) sign(x).
//   Sweeps: x (to Qs), y (to Qt), then Qs/Qt (HW entries) for the loss and dQs, then x again
//   (from cache: a sample's slab is Cs*HW entries) to write the gradient.
//   Memory traffic: read N*Cs*HW + N*Ct*HW, write N*Cs*HW.
#pragma once

#include "cpu/dispatch.h"
#include "cpu/row_io.h"
#include "feature_args.h"

// -- elementwise helpers ----------------------------------------------------------------------
// On the vector types' raw member `v`: a GCC vector (__m256, __m512) or, for VecScalar, a plain
// scalar. GCC's vector extensions give comparisons and selects in whatever instruction set this
// translation unit targets, so these need nothing from the vec_*.h types.

template <class V>
static inline V v_abs(V x) {
  const auto z = V::set1(0).v;
  return {x.v < z ? -x.v : x.v};  // NaN stays NaN
}

// sign(x) with sign(0) = sign(NaN) = 0, as torch.sign (and so F.l1_loss's gradient).
template <class V>
static inline V v_sign(V x) {
  const auto z = V::set1(0).v, one = V::set1(1).v;
  return {x.v > z ? one : (x.v < z ? -one : z)};
}

// clamp(x, -1, 1), NaN stays NaN.
template <class V>
static inline V v_clamp1(V x) {
  const auto one = V::set1(1).v;
  return {x.v > one ? one : (x.v < -one ? -one : x.v)};
}

template <class V>
static inline V feature_div(V x, V y) {
  return {x.v / y.v};
}

template <class V>
static inline V v_min1(V x) {  // min(x, 1) for x >= 0 or NaN; NaN stays NaN
  const auto one = V::set1(1).v;
  return {x.v > one ? one : x.v};
}

// Sums kept in vector accumulators and emptied into double totals every kFlushBlock entries, so
// that rounding does not grow with the row length (as in kd_kernel.h).
template <class V>
struct FlushSum {
  V acc = V::set1(0);
  double total = 0;
  void add(V x) { acc = acc + x; }
  void flush() {
    total += double(acc.sum());
    acc = V::set1(0);
  }
};

template <class V>
constexpr int64_t kFlushBlock = 64 * V::L;

// One sweep over n entries of s and t, their last partial vector padded with 0 in both: step(xs,
// xt) for each vector, flush() after every kFlushBlock entries and after the tail. Where step
// returns a vector and g is not null, the vector is written to g, rounded once to TS, with
// non-temporal stores when `stream` and g is aligned to a vector.
template <class V, class TS, class TT, class Step, class Flush>
static inline void feature_sweep(const TS* s, const TT* t, TS* g, int64_t n, bool stream, Step&& step, Flush&& flush) {
  using C = typename V::scalar;
  constexpr int L = V::L;
  constexpr bool returns = !std::is_void_v<std::invoke_result_t<Step&, V, V>>;
  const int64_t n_full = n - n % L;
  const int64_t n_tail = n - n_full;
  if (!returns) g = nullptr;
  stream = g && stream && reinterpret_cast<uintptr_t>(g) % (L * sizeof(TS)) == 0;
  for (int64_t b = 0; b < n_full; b += kFlushBlock<V>) {
    const int64_t e = std::min(b + kFlushBlock<V>, n_full);
    if (!g) {
      for (int64_t i = b; i < e; i += L) step(V::load(s + i), V::load(t + i));
    } else if constexpr (returns) {
      if (stream) {
        for (int64_t i = b; i < e; i += L) step(V::load(s + i), V::load(t + i)).stream(g + i);
      } else {
        for (int64_t i = b; i < e; i += L) step(V::load(s + i), V::load(t + i)).store(g + i);
      }
    }
    flush();
  }
  if (n_tail) {
    const V xs = load_tail<V>(s + n_full, n_tail, C(0)), xt = load_tail<V>(t + n_full, n_tail, C(0));
    if (!g) {
      step(xs, xt);
    } else if constexpr (returns) {
      store_tail(step(xs, xt), g + n_full, n_tail);
    }
    flush();
  }
  if (stream) V::fence();
}

// -- hint: elementwise kinds ------------------------------------------------------------------

template <HintKind K, class V>
static inline void hint_elementwise_term(V e, V& loss, V& grad) {
  if constexpr (K == HintKind::Mse) {
    loss = e * e;
    grad = e + e;
  } else if constexpr (K == HintKind::L1) {
    loss = v_abs(e);
    grad = v_sign(e);
  } else {  // SmoothL1, beta = 1: with m = min(|e|, 1), m^2/2 + (|e| - m)
    const V a = v_abs(e);
    const V m = v_min1(a);
    loss = V::set1(0.5f) * m * m + (a - m);
    grad = v_clamp1(e);
  }
}

template <HintKind K, class V, class TS, class TT>
static void hint_elementwise_tasks(const HintArgs& a, int64_t begin, int64_t end) {
  using C = typename V::scalar;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t row = task / a.n_chunks;
    const V coef = V::set1(C(a.grad_coef * row_factor(a.grad_row_scale, row)));
    const int64_t lo = (task % a.n_chunks) * a.chunk;
    const int64_t n = std::min(a.dim, lo + a.chunk) - lo;
    const TS* s = static_cast<const TS*>(a.student) + row * a.dim + lo;
    const TT* t = static_cast<const TT*>(a.teacher) + row * a.dim + lo;
    TS* g = a.grad ? static_cast<TS*>(a.grad) + row * a.dim + lo : nullptr;
    FlushSum<V> sum;
    auto term = [&](V xs, V xt) {
      V loss, grad;
      hint_elementwise_term<K>(xs - xt, loss, grad);  // 0 padding: e = 0 adds nothing to the loss
      sum.add(loss);
      return grad * coef;
    };
    feature_sweep<V>(s, t, g, n, a.stream_grad, term, [&] { sum.flush(); });
    a.task_loss[task] = sum.total;
  }
}

// -- hint: cosine and normalized_mse (whole rows) ---------------------------------------------

template <HintKind K, class V, class TS, class TT>
static void hint_row_tasks(const HintArgs& a, int64_t begin, int64_t end) {
  using C = typename V::scalar;
  const int64_t n = a.dim;
  for (int64_t row = begin; row < end; ++row) {
    const TS* s = static_cast<const TS*>(a.student) + row * n;
    const TT* t = static_cast<const TT*>(a.teacher) + row * n;
    TS* g = a.grad ? static_cast<TS*>(a.grad) + row * n : nullptr;

    // Sweep 1: |s|^2, |t|^2, <s, t>. Each product is kept exactly, as its rounded value plus
    // its rounding error (fma(a, b, -a*b)), summed apart and joined in double: a row of one entry
    // (always parallel to its teacher) then gets cos = +-1 and a gradient of exactly 0.
    FlushSum<V> ss, tt, st, ss_lo, tt_lo, st_lo;
    auto exact_product = [](V a, V b, FlushSum<V>& hi, FlushSum<V>& lo) {
      const V p = a * b;
      hi.add(p);
      lo.add(V::fma(a, b, V::set1(0) - p));
    };
    auto sweep1 = [&](V xs, V xt) {
      exact_product(xs, xs, ss, ss_lo);
      exact_product(xt, xt, tt, tt_lo);
      exact_product(xs, xt, st, st_lo);
    };
    feature_sweep<V>(s, t, static_cast<TS*>(nullptr), n, false, sweep1,
                     [&] { ss.flush(), tt.flush(), st.flush(), ss_lo.flush(), tt_lo.flush(), st_lo.flush(); });

    // The row's scalars, in double.
    ss.total += ss_lo.total, tt.total += tt_lo.total, st.total += st_lo.total;
    const double eps = K == HintKind::Cosine ? kCosineEps : kNormalizeEps;
    const double ns = std::sqrt(ss.total), nt = std::sqrt(tt.total);
    // std::max(NaN, eps) is NaN (it returns its first argument unless that is less than the
    // second), so a row holding a NaN gets a NaN loss and gradient.
    const double cs = std::max(ns, eps), ct = std::max(nt, eps);
    const double inv_s = 1.0 / cs;
    // The gradient is coef_u * u + coef_v * v with u = s / Ns, v = t / Nt: for equal directions
    // the two terms then cancel exactly, as in the reference.
    const double gc = a.grad_coef * row_factor(a.grad_row_scale, row);
    double coef_u, coef_v;
    if constexpr (K == HintKind::Cosine) {
      // -t / (Ns Nt) + cos s / (Ns |s|)   (the second term 0 when |s| = 0)
      const double cosine = st.total / (cs * ct);  // divided: +-1 exactly for parallel rows
      coef_u = ns > 0 ? gc * cosine / ns : (ns == 0 ? 0.0 : ns);
      coef_v = -gc * inv_s;
    } else {
      // 2/Ns (u - v - [|s| >= eps] u <u, r>),  <u, r> = |u|^2 - <u, v>
      const double ur = ss.total / (cs * cs) - st.total / (cs * ct);
      const double keep = ns >= eps ? ur : (ns < eps ? 0.0 : ns);  // NaN: NaN
      coef_u = 2 * gc * inv_s * (1 - keep);
      coef_v = -2 * gc * inv_s;
    }

    // Sweep 2: the loss entry by entry, |u - v|^2, and the gradient. u and v are divided, not
    // multiplied by a reciprocal, as the reference does: equal directions then give exactly 0.
    const V vns = V::set1(C(cs)), vnt = V::set1(C(ct));
    const V vcu = V::set1(C(coef_u)), vcv = V::set1(C(coef_v));
    FlushSum<V> dd;
    auto sweep2 = [&](V xs, V xt) {
      const V u = feature_div(xs, vns), v = feature_div(xt, vnt);
      const V d = u - v;
      dd.add(d * d);
      return V::fma(vcu, u, vcv * v);
    };
    feature_sweep<V>(s, t, g, n, a.stream_grad, sweep2, [&] { dd.flush(); });
    if constexpr (K == HintKind::Cosine) {
      // 1 - cos = |u - v|^2 / 2 + (1 - (|u|^2 + |v|^2) / 2); the second term is exactly 0 unless
      // a norm was clamped.
      const bool clamped = ns < eps || nt < eps;
      const double us = ss.total / (cs * cs), vt = tt.total / (ct * ct);
      a.task_loss[row] = 0.5 * dd.total + (clamped ? 1 - 0.5 * (us + vt) : 0.0);
    } else {
      a.task_loss[row] = dd.total;
    }
  }
}

// The entry point for tasks [begin, end) (see HintArgs).
void hint_tasks(const HintArgs& a, int64_t begin, int64_t end) {
  with_storage(a.student_dtype, a.teacher_dtype, [&](auto s, auto t) {
    using TS = typename decltype(s)::type;
    using TT = typename decltype(t)::type;
    using V = VecFor<TS, TT>;
    switch (a.kind) {
      case HintKind::Mse: return hint_elementwise_tasks<HintKind::Mse, V, TS, TT>(a, begin, end);
      case HintKind::L1: return hint_elementwise_tasks<HintKind::L1, V, TS, TT>(a, begin, end);
      case HintKind::SmoothL1: return hint_elementwise_tasks<HintKind::SmoothL1, V, TS, TT>(a, begin, end);
      case HintKind::Cosine: return hint_row_tasks<HintKind::Cosine, V, TS, TT>(a, begin, end);
      case HintKind::NormalizedMse: return hint_row_tasks<HintKind::NormalizedMse, V, TS, TT>(a, begin, end);
    }
  });
}

// -- attention transfer -----------------------------------------------------------------------

// |x|^p, and d|x|^p/dx / p = |x|^(p-1) sign(x), for the exponents with a vector form (1 to 4).
template <int P, class V>
static inline V at_power(V x) {
  if constexpr (P == 1) return v_abs(x);
  if constexpr (P == 2) return x * x;
  if constexpr (P == 3) return v_abs(x) * x * x;
  if constexpr (P == 4) return (x * x) * (x * x);
}

template <int P, class V>
static inline V at_power_slope(V x) {
  if constexpr (P == 1) return v_sign(x);
  if constexpr (P == 2) return x;
  if constexpr (P == 3) return v_abs(x) * x;
  if constexpr (P == 4) return x * x * x;
}

// Any other p >= 1: one entry at a time with std::pow.
template <class C>
static inline C at_power_any(C x, C p) {
  return std::pow(std::abs(x), p);
}

template <class C>
static inline C at_power_slope_any(C x, C p) {
  if (x != x) return x;
  if (x == 0) return C(0);
  const C m = std::pow(std::abs(x), p - 1);
  return x > 0 ? m : -m;
}

// q[j] = mean_c |x[c, j]|^p over `channels` rows of `spatial` entries; q has spatial + L entries.
template <int P, class V, class T>
static void at_channel_mean(const T* x, int64_t channels, int64_t spatial, double p, typename V::scalar* q) {
  using C = typename V::scalar;
  constexpr int L = V::L;
  const int64_t n_full = spatial - spatial % L;
  const int64_t n_tail = spatial - n_full;
  for (int64_t j = 0; j < spatial + L; ++j) q[j] = C(0);  // with the padding read by whole vectors
  for (int64_t c = 0; c < channels; ++c) {
    const T* xc = x + c * spatial;
    if constexpr (P > 0) {
      for (int64_t j = 0; j < n_full; j += L) (V::load(q + j) + at_power<P>(V::load(xc + j))).store(q + j);
      if (n_tail) {
        const V add = at_power<P>(load_tail<V>(xc + n_full, n_tail, C(0)));
        store_tail(V::load(q + n_full) + add, q + n_full, n_tail);
      }
    } else {
      for (int64_t j = 0; j < spatial; ++j) q[j] += at_power_any(to_compute<C>(xc[j]), C(p));
    }
  }
  const C inv = C(1.0 / double(channels));
  for (int64_t j = 0; j < spatial; ++j) q[j] *= inv;
}

template <int P, class V, class TS, class TT>
static void attention_rows(const AttentionArgs& a, int64_t begin, int64_t end, void* scratch) {
  using C = typename V::scalar;
  constexpr int L = V::L;
  const int64_t hw = a.spatial;
  const int64_t padded = hw + L;  // q rows are read a whole vector at a time at their tail
  C* const qs = static_cast<C*>(scratch);
  C* const qt = qs + padded;
  for (int64_t row = begin; row < end; ++row) {
    const TS* x = static_cast<const TS*>(a.student) + row * a.s_channels * hw;
    const TT* y = static_cast<const TT*>(a.teacher) + row * a.t_channels * hw;
    TS* g = a.grad ? static_cast<TS*>(a.grad) + row * a.s_channels * hw : nullptr;

    at_channel_mean<P, V>(x, a.s_channels, hw, a.p, qs);
    at_channel_mean<P, V>(y, a.t_channels, hw, a.p, qt);

    // Norms, then the loss and <a_s, r> entry by entry, in double (HW entries: cheap).
    double nss = 0, ntt = 0;
    for (int64_t j = 0; j < hw; ++j) {
      nss += double(qs[j]) * double(qs[j]);
      ntt += double(qt[j]) * double(qt[j]);
    }
    const double ns = std::sqrt(nss), nt = std::sqrt(ntt);
    const double cs = std::max(ns, kNormalizeEps), ct = std::max(nt, kNormalizeEps);
    const double inv_s = 1.0 / cs;
    double loss = 0, ar = 0;
    for (int64_t j = 0; j < hw; ++j) {
      const double as = double(qs[j]) / cs;  // divided, as the reference: equal maps give exactly 0
      const double r = as - double(qt[j]) / ct;
      loss += r * r;
      ar += as * r;
    }
    a.row_loss[row] = loss;
    if (!g) continue;

    // w[j] = dL/dQs[j] * p / Cs, kept in qs; then grad[c, j] = w[j] * |x|^(p-1) sign(x).
    const double keep = ns >= kNormalizeEps ? ar : (ns < kNormalizeEps ? 0.0 : ns);
    const double k = a.grad_coef * row_factor(a.grad_row_scale, row) * 2 * inv_s * a.p / double(a.s_channels);
    for (int64_t j = 0; j < hw; ++j) {
      const double as = double(qs[j]) / cs;
      const double r = as - double(qt[j]) / ct;
      qs[j] = C(k * (r - as * keep));
    }
    const int64_t n_full = hw - hw % L;
    const int64_t n_tail = hw - n_full;
    for (int64_t c = 0; c < a.s_channels; ++c) {
      const TS* xc = x + c * hw;
      TS* gc = g + c * hw;
      if constexpr (P > 0) {
        const bool stream = a.stream_grad && reinterpret_cast<uintptr_t>(gc) % (L * sizeof(TS)) == 0;
        if (stream) {
          for (int64_t j = 0; j < n_full; j += L) (V::load(qs + j) * at_power_slope<P>(V::load(xc + j))).stream(gc + j);
        } else {
          for (int64_t j = 0; j < n_full; j += L) (V::load(qs + j) * at_power_slope<P>(V::load(xc + j))).store(gc + j);
        }
        if (n_tail) store_tail(V::load(qs + n_full) * at_power_slope<P>(load_tail<V>(xc + n_full, n_tail, C(0))), gc + n_full, n_tail);
      } else {
        for (int64_t j = 0; j < hw; ++j) gc[j] = from_compute<TS>(qs[j] * at_power_slope_any(to_compute<C>(xc[j]), C(a.p)));
      }
    }
    if (a.stream_grad) V::fence();
  }
}

// The entry point for rows [begin, end); scratch: 2 * (spatial + 16) entries of the compute type.
void attention_rows(const AttentionArgs& a, int64_t begin, int64_t end, void* scratch) {
  with_storage(a.student_dtype, a.teacher_dtype, [&](auto s, auto t) {
    using TS = typename decltype(s)::type;
    using TT = typename decltype(t)::type;
    using V = VecFor<TS, TT>;
    if (a.p == 1) return attention_rows<1, V, TS, TT>(a, begin, end, scratch);
    if (a.p == 2) return attention_rows<2, V, TS, TT>(a, begin, end, scratch);
    if (a.p == 3) return attention_rows<3, V, TS, TT>(a, begin, end, scratch);
    if (a.p == 4) return attention_rows<4, V, TS, TT>(a, begin, end, scratch);
    return attention_rows<0, V, TS, TT>(a, begin, end, scratch);
  });
}
