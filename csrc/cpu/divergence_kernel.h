// Fused KD with the other divergences, and with an ensemble of teachers, on the CPU: one row's
// loss and gradient, generic over the vector type; built from the shared row sweep
// (softmax_rows.h) like kd_kernel.h, which keeps the plain one-teacher forward KL.
//
// Math (docs/design.md#divergences), per row, with a = s/T, q = softmax(a) (student) and
// p = softmax(t/T) (teacher), or for an ensemble p = sum_m w_m softmax(t_m/T). Every divergence
// L(p, q) has, by the softmax Jacobian, the gradient dL/da_j = q_j (g_j - sum_i q_i g_i),
// g = dL/dq, so the kernel computes per entry x_j = g_j / k and the row statistic
// c = sum_i q_i x_i, then grad_j = k q_j (x_j - c) (k: divergence_grad_factor, divergence.h):
//
//   divergence        L (per row)                        x_j                     k      c
//   reverse_kl        sum q (lq - lp)                    lq - lp                 1      L
//   jsd               b sum p (lp - lm) + (1-b) sum q (lq - lm),  m = b p + (1-b) q
//                                                        lq - lm                 1-b    KL(q||m)
//   tvd               1/2 sum |p - q|                    sign(q - p)             1/2    sum q sign(q - p)
//   skew_kl           sum p (lp - lm),  m = b p + (1-b) q
//                                                        -p/m                    1-b    -sum q p/m
//   skew_reverse_kl   sum q (lq - lm),  m = (1-b) p + b q
//                                                        (lq - lm) - b q/m       1      L - b sum q^2/m
//   hellinger         1/2 sum (sqrt p - sqrt q)^2        -sqrt(p/q)              1/2    -sum sqrt(p q)
//   kl (ensemble)     sum p (lp - lq)                    (grad = q - p directly)
//
// (sign(0) = 0: TVD's subgradient at p = q is 0. Hellinger's x is -inf at q = 0, where q x is 0:
// zero_where_zero(q, ...) below takes it so.) The gradient w.r.t. s is (1/T) dL/da, times
// T^2 with t2_scale: soft_grad_coef already holds (1 - hard_weight) (T or 1/T) (reduction scale).
//
// Logarithms are never taken of probabilities that may have underflowed:
//   lq = (s - ms)/T - log S_s and, for one teacher, lp = (t - mt)/T - log S_t, exactly;
//   log m = log(m) where every m of the vector is at least 2^-96 (2^-960 in double): p and q
//   then carry full relative precision wherever they matter to m (an underflowed one is below
//   2^-126 of m's size), and one log per entry suffices; a vector with a smaller m takes the
//   exact log m = logaddexp(A, B) = max(A, B) + log(1 + exp(-|A - B|)) with A, B = log b + lp,
//   log(1-b) + lq (or the other way round), so a row whose log-probabilities fall below -104
//   (where float32 probabilities are 0) keeps finite, correct terms;
//   for an ensemble, lp = log(sum_m w_m e_m / S_m) where that sum is at least 2^-96, else, where
//   such a p meets a nonzero q, the exact logsumexp_m(log w_m - log S_m + (t_m - mt_m)/T) from
//   the teachers' logits.
// An entry where p and q are both 0 (masked vocabulary: -inf in both) contributes 0 and gets a
// zero gradient: every term is weighted by p or q through zero_where_zero, so its NaN
// intermediates (-inf - -inf) are dropped. A NaN logit in a valid row makes S_s or S_t NaN and
// the whole row NaN.
//
// Sweeps, one teacher: (1) maxima of s and t; (2) e_s, e_t into the per-thread scratch, and
// their sums (the next row is prefetched meanwhile); (3) statistics: s and t re-read from cache
// with e_s, e_t; x_j written over e_t; (4) the gradient from e_s and x.
// Ensemble: (1-2) for s alone; then per teacher m: its maximum, e_m into a scratch row with its
// sum S_m, and P += (w_m / S_m) e_m (the next teacher's row is prefetched during this one); (3)
// statistics from e_s and P (x written over P); (4) as before.
// Memory traffic: read (M+1)·N·V, write N·V (the gradient, non-temporal when it outgrows the
// caches); the scratch rows stay in L2/L3. Transcendentals per entry: one teacher, 2 exp
// (reverse_kl, tvd), 2 exp + 1 log (jsd, skew_kl, skew_reverse_kl), 4 exp (hellinger); an
// ensemble adds M - 1 exp and 1 log.
#pragma once

#include "cpu/softmax_rows.h"
#include "kd_args.h"

// log m = logaddexp(a, b) = max(a, b) + log(1 + e), e = exp(-|a - b|); also returns e, from
// which the ratios of the two terms to m follow without another exp: with a = log b_a + lx,
// exp(lx - log m) = (a >= b ? 1 : e) / (b_a (1 + e)).
template <class V>
static inline V logaddexp(V a, V b, V& e) {
  using C = typename V::scalar;
  e = V::exp(V::set1(C(0)) - V::abs(a - b));
  return V::max(a, b) + V::log(V::set1(C(1)) + e);
}

// Per-divergence constants of a call.
template <class C>
struct DivConsts {
  Divergence d;
  C beta, one_minus_b, log_b, log_1mb;  // b, 1 - b, log b, log(1 - b) (0 where unused)
  C m_floor;                            // below it log m is taken exactly (see the top)
};

// log m of the mixture m = wp p + wq q: one log where every m of the vector is at least the
// floor (fast, with m returned), else the exact logaddexp of a = log wp + lp and b = log wq + lq,
// whose e then gives the ratios of the two terms to m (logaddexp).
template <class V>
static inline bool log_mixture(const DivConsts<typename V::scalar>& k, typename V::scalar wp, typename V::scalar wq,
                               typename V::scalar log_wp, typename V::scalar log_wq, V p, V lp, V q, V lq, V& m, V& lm, V& a,
                               V& b, V& e) {
  m = V::fma(V::set1(wp), p, V::set1(wq) * q);
  if (!V::any_below_where(m, k.m_floor, V::set1(typename V::scalar(1)))) {
    lm = V::log(m);
    return true;
  }
  a = V::set1(log_wp) + lp;
  b = V::set1(log_wq) + lq;
  lm = logaddexp(a, b, e);
  return false;
}

// One vector of entries: the loss term t1 (see divergence_loss) and x.
template <class V>
static inline void div_entry(const DivConsts<typename V::scalar>& k, V q, V lq, V p, V lp, V& t1, V& x) {
  using C = typename V::scalar;
  const V one = V::set1(C(1));
  V m, lm, a, b, e;
  switch (k.d) {
    case Divergence::KL:
      x = p;
      t1 = V::zero_where_zero(p, p * (lp - lq));
      break;
    case Divergence::ReverseKL:
      x = lq - lp;
      t1 = V::set1(C(0));
      break;
    case Divergence::JSD:
      log_mixture(k, k.beta, k.one_minus_b, k.log_b, k.log_1mb, p, lp, q, lq, m, lm, a, b, e);
      x = lq - lm;
      t1 = V::zero_where_zero(p, p * (lp - lm));
      break;
    case Divergence::TVD: {
      const V d = q - p;
      x = V::sign(d);
      t1 = V::abs(d);
      break;
    }
    case Divergence::SkewKL:
      // m = b p + (1-b) q; x = -p/m, exactly (a >= b ? 1 : e) / (b (1 + e)) on the exact path.
      if (log_mixture(k, k.beta, k.one_minus_b, k.log_b, k.log_1mb, p, lp, q, lq, m, lm, a, b, e)) {
        x = V::set1(C(0)) - p / m;
      } else {
        x = V::set1(C(0)) - V::where_neg(a - b, e, one) / (V::set1(k.beta) * (one + e));
      }
      t1 = V::zero_where_zero(p, p * (lp - lm));
      break;
    case Divergence::SkewReverseKL: {
      // m = (1-b) p + b q; x = (lq - lm) - b q/m, b q/m = (b >= a ? 1 : e) / (1 + e) exactly.
      const bool fast = log_mixture(k, k.one_minus_b, k.beta, k.log_1mb, k.log_b, p, lp, q, lq, m, lm, a, b, e);
      const V d = lq - lm;
      x = d - (fast ? V::set1(k.beta) * q / m : V::where_neg(b - a, e, one) / (one + e));
      t1 = V::zero_where_zero(q, q * d);
      break;
    }
    case Divergence::Hellinger: {
      // sqrt p and sqrt q from the exact logs (finite where p or q underflow); the loss as a sum
      // of squares, which does not cancel near p = q as 1 - sum sqrt(p q) would.
      const V half = V::set1(C(0.5));
      const V sp = V::exp(half * lp), sq = V::exp(half * lq), d = sp - sq;
      x = V::set1(C(0)) - sp / sq;
      t1 = d * d;
      break;
    }
  }
}

// The row's divergence from the statistics' totals (acc1 = sum t1, accc = sum q x).
static inline double divergence_loss(Divergence d, double beta, double acc1, double accc) {
  double loss = 0;
  switch (d) {
    case Divergence::KL: loss = acc1; break;
    case Divergence::ReverseKL: loss = accc; break;
    case Divergence::JSD: loss = beta * acc1 + (1 - beta) * accc; break;
    case Divergence::TVD:
    case Divergence::Hellinger: loss = 0.5 * acc1; break;
    case Divergence::SkewKL: loss = acc1; break;
    case Divergence::SkewReverseKL: loss = acc1; break;
  }
  return loss < 0 ? 0 : loss;  // every one is >= 0; rounding can leave -1e-16 at p == q (NaN kept)
}

// The ensemble's teachers of one row: P = sum_m (w_m / S_m) e_m into `mix`, each teacher's
// maximum into t_max and log w_m - log S_m into t_logc; the next teacher's row is prefetched
// during each one, and `next_s` during the last.
template <class V, class TS, class TT>
static void ensemble_mixture(const TT* t, int64_t teacher_stride, int64_t n_teachers, const double* t_w, const RowShape<V>& r,
                             typename V::scalar inv_t, typename V::scalar* erow, typename V::scalar* mix, double* t_max,
                             double* t_logc, const TS* next_s) {
  using C = typename V::scalar;
  for (int64_t m = 0; m < n_teachers; ++m) {
    const TT* tm = t + m * teacher_stride;
    const C mx = row_max(tm, r);
    ExpRows<C, TT, TS> out{erow};
    if (m + 1 < n_teachers) out.next_s = tm + teacher_stride;
    else out.next_t = next_s;
    const double sm = exp_sweep<V, false, false>(tm, static_cast<const TS*>(nullptr), r, mx, C(0), inv_t, false, out).s;
    t_max[m] = double(mx);
    t_logc[m] = std::log(t_w[m]) - std::log(sm);
    const V c = V::set1(C(t_w[m] / sm));
    const int64_t len = r.n_full + (r.n_tail ? V::L : 0);
    if (m == 0) {
      for (int64_t i = 0; i < len; i += V::L) (c * V::load(erow + i)).store(mix + i);
    } else {
      for (int64_t i = 0; i < len; i += V::L) V::fma(c, V::load(erow + i), V::load(mix + i)).store(mix + i);
    }
  }
}

// The exact log of the mixture at entries [i, i + L) of the row (see the top).
template <class V, class TT, class Part>
static inline V ensemble_exact_lp(const TT* t, int64_t teacher_stride, int64_t n_teachers, const double* t_max,
                                  const double* t_logc, V vit, int64_t i, Part part) {
  using C = typename V::scalar;
  auto term = [&](int64_t m) {
    return V::set1(C(t_logc[m])) + (load_part<V>(t + m * teacher_stride + i, part) - V::set1(C(t_max[m]))) * vit;
  };
  V best = V::set1(-std::numeric_limits<C>::infinity());
  for (int64_t m = 0; m < n_teachers; ++m) best = V::max(best, term(m));
  V sum = V::set1(C(0));
  for (int64_t m = 0; m < n_teachers; ++m) sum = sum + V::exp(term(m) - best);
  return best + V::log(sum);
}

// Ensemble: the teacher is a mixture of n_teachers > 1 softmaxes.
template <class V, class TS, class TT, bool Ensemble>
static void divergence_rows(const KdArgs& a, int64_t row_begin, int64_t row_end, void* scratch) {
  using C = typename V::scalar;
  const RowShape<V> r(a.vocab);
  const int64_t n = a.vocab;
  const int64_t M = a.n_teachers;
  const int64_t teacher_stride = a.n_rows * n;
  const C inv_t = C(a.inv_temperature);
  const V vit = V::set1(inv_t);
  const bool hard = a.hard_weight > 0;
  const bool ce_needs_own_sum = hard && a.inv_temperature != 1;
  const Divergence dv = a.divergence;
  const bool kl_form = dv == Divergence::KL;
  const C m_floor = std::is_same_v<C, double> ? C(0x1p-960) : C(0x1p-96);
  DivConsts<C> k{dv, C(a.beta), C(1 - a.beta), C(0), C(0), m_floor};
  if (divergence_has_beta(dv)) {
    k.log_b = C(std::log(a.beta));
    k.log_1mb = C(std::log1p(-a.beta));
  }

  C* const exp_s = scratch_row<C>(scratch, n, 0);
  C* const xrow = scratch_row<C>(scratch, n, 1);  // e_t (one teacher) or P (ensemble), then x
  C* const erow = scratch_row<C>(scratch, n, 2);  // ensemble: e_m of one teacher
  double* const t_max = reinterpret_cast<double*>(scratch_row<C>(scratch, n, Ensemble ? 3 : 2));
  double* const t_logc = t_max + M;  // log w_m - log S_m
  double* const t_w = t_logc + M;
  for (int64_t m = 0; m < M; ++m) t_w[m] = a.teacher_weights ? a.teacher_weights[m] : 1.0 / double(M);

  // t: teacher 0's row; teacher m's at t + m * teacher_stride.
  for_each_live_row<TS, TT>(a, row_begin, row_end, [&](int64_t row, const TS* s, const TT* t, TS* g) {
    const int64_t label = a.labels ? a.labels[row] : -1;
    const bool last = row + 1 == row_end;

    // Sweeps 1-2: the student, with the teacher (one teacher: the next row is fetched
    // meanwhile) or followed by the ensemble's teachers (teacher 0 of this row is fetched).
    C ms, mt = 0;
    ExpSums tot;
    if constexpr (!Ensemble) {
      row_max2(s, t, r, ms, mt);
      tot = exp_sweep<V, true, false>(s, t, r, ms, mt, inv_t, ce_needs_own_sum,
                                      ExpRows<C, TS, TT>::with_next(exp_s, xrow, s, t, n, last));
    } else {
      ms = row_max(s, r);
      tot = exp_sweep<V, false, false>(s, t, r, ms, mt, inv_t, ce_needs_own_sum, ExpRows<C, TS, TT>{exp_s, nullptr, nullptr, t});
      ensemble_mixture(t, teacher_stride, M, t_w, r, inv_t, erow, xrow, t_max, t_logc, last ? nullptr : s + n);
    }

    // Sweep 3: statistics; x written over e_t / P.
    const C inv_ss = C(1 / tot.s);
    const V vinv_ss = V::set1(inv_ss), vms = V::set1(ms), vlog_ss = V::set1(C(std::log(tot.s)));
    const V vinv_st = V::set1(C(1 / tot.t)), vmt = V::set1(mt), vlog_st = V::set1(C(std::log(tot.t)));
    const V zero = V::set1(C(0));
    V acc1 = zero, accc = zero;
    double tot1 = 0, totc = 0;
    auto stats = [&](int64_t i, auto part) {
      const V q = V::load(exp_s + i) * vinv_ss;
      const V lq = (load_part<V>(s + i, part) - vms) * vit - vlog_ss;
      V p, lp;
      if constexpr (Ensemble) {
        p = V::load(xrow + i);
        lp = V::any_below_where(p, k.m_floor, q) ? ensemble_exact_lp(t, teacher_stride, M, t_max, t_logc, vit, i, part) : V::log(p);
      } else {
        p = V::load(xrow + i) * vinv_st;
        lp = (load_part<V>(t + i, part) - vmt) * vit - vlog_st;
      }
      V t1, x;
      div_entry<V>(k, q, lq, p, lp, t1, x);
      x.store(xrow + i);
      acc1 = acc1 + t1;
      if (!kl_form) accc = accc + V::zero_where_zero(q, q * x);
    };
    blocked_sweep(r, stats, [&] {
      tot1 += double(acc1.sum()), totc += double(accc.sum());
      acc1 = accc = zero;
    });

    double loss = 0;
    if (a.soft_loss_coef != 0) loss += a.soft_loss_coef * divergence_loss(dv, a.beta, tot1, totc);
    if (hard) loss += a.hard_weight * row_cross_entropy(ms, ce_needs_own_sum ? tot.ce : tot.s, s, label);
    a.row_loss[row] = loss;
    if (!g) return;

    // Sweep 4: the gradient, k q (x - c) (kl: k (q - p)) plus the CE's softmax; with T == 1 the
    // CE softmax is q itself.
    const GradCoefs gc = grad_coefs(a, row);
    const C ks = C(gc.soft * divergence_grad_factor(dv, a.beta));
    const C c = kl_form ? C(0) : C(totc);
    const C hard_coef = C(gc.hard);
    const C cq_ce = hard && !ce_needs_own_sum ? hard_coef : C(0);  // times q, already normalised
    const C cce = ce_needs_own_sum ? C(gc.hard / tot.ce) : C(0);
    const V vks = V::set1(ks), vc = V::set1(c), vcq_ce = V::set1(cq_ce), vcce = V::set1(cce);
    write_grad_row(g, r, a.stream_grad, [&](int64_t i, auto part) {
      const V q = V::load(exp_s + i) * vinv_ss;
      const V x = V::load(xrow + i);
      V v = kl_form ? vks * (q - x) : vks * V::zero_where_zero(q, q * (x - vc));
      if (hard && !ce_needs_own_sum) v = V::fma(vcq_ce, q, v);
      if (ce_needs_own_sum) v = V::fma(vcce, V::exp(load_part<V>(s + i, part) - vms), v);
      return v;
    });
    if (hard) {
      // The one-hot term, at the label only, written once.
      const C q = exp_s[label] * inv_ss, x = xrow[label];
      C gl = kl_form ? ks * (q - x) : (q == C(0) ? C(0) : ks * q * (x - c));
      gl += cq_ce * q + cce * std::exp(to_compute<C>(s[label]) - ms) - hard_coef;
      g[label] = from_compute<TS>(gl);
    }
  });
}

// The entry point: every storage-type pair, float64 input computing in double.
void divergence_rows(const KdArgs& a, int64_t begin, int64_t end, void* scratch) {
  with_storage(a.student_dtype, a.teacher_dtype, [&](auto s, auto t) {
    using TS = typename decltype(s)::type;
    using TT = typename decltype(t)::type;
    if (a.n_teachers > 1) {
      divergence_rows<VecFor<TS, TT>, TS, TT, true>(a, begin, end, scratch);
    } else {
      divergence_rows<VecFor<TS, TT>, TS, TT, false>(a, begin, end, scratch);
    }
  });
}
