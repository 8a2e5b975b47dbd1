// Fused decoupled KD (Zhao et al. 2022) on the CPU: one row's loss and gradient, generic over the
// vector type; built from the shared row sweep (softmax_rows.h).
//
// Math (docs/design.md#dkd), per row, with s = student, t = teacher logits, y the label, T the temperature,
// a = s/T, b = t/T, R = the non-target classes {j != y}:
//
//   q = softmax(a), p = softmax(b)                 (student, teacher)
//   q^_j = softmax over R of a, p^_j likewise      (j in R; "the target removed, renormalised")
//   d_s = a_y - lse_R(a), d_t = b_y - lse_R(b)     (the target's log-odds against the rest)
//   q_y = sigmoid(d_s), 1 - q_y = sigmoid(-d_s)    (so log q_y = logsigmoid(d_s) and
//   p_y = sigmoid(d_t), 1 - p_y = sigmoid(-d_t)     log(1 - q_y) = logsigmoid(-d_s): no 1 - x)
//   TCKD = p_y log(p_y / q_y) + (1 - p_y) log((1 - p_y) / (1 - q_y))
//   NCKD = sum_R p^ (log p^ - log q^)
//   loss = T^2 (alpha TCKD + beta NCKD)
//
// Gradient. TCKD depends on a only through z = d_s, the logit of a two-class softmax, so
// dTCKD/dz = q_y - p_y (the binary cross-entropy derivative; the teacher's entropy is constant).
// dz/da_y = 1 and dz/da_j = -q^_j for j in R (d lse_R(a) / da_j = q^_j). NCKD is a KL between
// softmaxes over R: dNCKD/da_j = q^_j - p^_j on R, 0 at y. With ds = da / T:
//
//   dloss/ds_y = T alpha (q_y - p_y)
//   dloss/ds_j = T [beta (q^_j - p^_j) + alpha (p_y - q_y) q^_j]              (j in R)
//              = cq e_s_j - cp e_t_j,   cq = T (beta + alpha (p_y - q_y)) / S_s,  cp = T beta / S_t
//
// where e_s_j = exp((s_j - ms)/T), S_s = sum_R e_s, ms = max_R s (likewise e_t, S_t, mt): the
// KD kernel's sweep 3 with different coefficients. Each row's gradient sums to 0.
//
// Everything non-target is taken over R only: the target's entry is loaded as -inf (exp -> 0)
// in sweeps 1 and 2, so the maxima, sums and the NCKD numerator never contain it, and a target
// that dominates the row by any margin cannot flush the non-target sums (S_s >= 1 always).
// Then, in double: lse_R(a) = ms/T + log S_s,
//   NCKD = [sum_R e_t ((t - mt) - (s - ms))/T] / S_t + log S_s - log S_t     (as kd_kernel.h)
//   d_s = (s_y - ms)/T - log S_s,   d_t = (t_y - mt)/T - log S_t
// and TCKD and q_y - p_y from logsigmoid / sigmoid of d_s, d_t, finite for any margin.
//
// Sweeps and memory traffic exactly as kd_kernel.h: read 2·N·V (student, teacher), write N·V
// (gradient, non-temporal stores when it outgrows the caches); two exp per entry.
#pragma once

#include "cpu/softmax_rows.h"
#include "dkd_args.h"

// V::L entries of p (the first `count` of them; the rest pad) with entry `skip` replaced by pad.
template <class V, class T>
static inline V load_without(const T* p, int64_t count, int64_t skip, typename V::scalar pad) {
  using C = typename V::scalar;
  alignas(64) C buf[V::L];
  for (int i = 0; i < V::L; ++i) buf[i] = i < count && i != skip ? C(to_compute<C>(p[i])) : pad;
  return V::load(buf);
}

// The loader of the non-target sweeps: the target's entry reads as -inf (softmax_rows.h).
struct LoadWithoutTarget {
  int64_t ky;      // the vector that holds the target (n_full when it is in the tail) ...
  int64_t lane;    // ... and its lane
  int64_t n_full;
  template <class V, class T>
  V load(const T* p, int64_t i, FullVec) const {
    if (i == ky) [[unlikely]]
      return load_without<V>(p + i, V::L, lane, -std::numeric_limits<typename V::scalar>::infinity());
    return V::load(p + i);
  }
  template <class V, class T>
  V load(const T* p, int64_t i, TailVec tail) const {
    return load_without<V>(p + i, tail.count, ky == n_full ? lane : -1, -std::numeric_limits<typename V::scalar>::infinity());
  }
};

// log(sigmoid(x)), accurate for any x; -inf at -inf, NaN kept.
static inline double log_sigmoid(double x) { return x >= 0 ? -std::log1p(std::exp(-x)) : x - std::log1p(std::exp(x)); }

static inline double sigmoid(double x) {
  if (x >= 0) return 1 / (1 + std::exp(-x));
  const double e = std::exp(x);
  return e / (1 + e);
}

// KL([p, 1 - p] || [q, 1 - q]) for p = sigmoid(d_t), q = sigmoid(d_s); a term whose teacher
// probability is 0 is 0 (not 0 * inf).
static inline double binary_kl(double d_t, double d_s) {
  const double lp = log_sigmoid(d_t), lp_not = log_sigmoid(-d_t);
  const double p = std::exp(lp), p_not = std::exp(lp_not);
  const double on = p == 0 ? 0.0 : p * (lp - log_sigmoid(d_s));
  const double off = p_not == 0 ? 0.0 : p_not * (lp_not - log_sigmoid(-d_s));
  return on + off;
}

// sigmoid(d_s) - sigmoid(d_t), from whichever side of 1/2 keeps the digits: when both are near
// 1, as (1 - sigmoid(d_t)) - (1 - sigmoid(d_s)).
static inline double sigmoid_difference(double d_s, double d_t) {
  if (d_s + d_t > 0) return sigmoid(-d_t) - sigmoid(-d_s);
  return sigmoid(d_s) - sigmoid(d_t);
}

// scratch: TwoRowStart's two rows.
template <class V, class TS, class TT>
static void dkd_rows(const DkdArgs& a, int64_t row_begin, int64_t row_end, void* scratch) {
  using C = typename V::scalar;
  const int64_t n = a.vocab;
  const auto [r, inv_t, exp_s, exp_t] = TwoRowStart<V>(a, scratch);

  for_each_live_row<TS, TT>(a, row_begin, row_end, [&](int64_t row, const TS* s, const TT* t, TS* g) {
    const int64_t label = a.labels[row];
    const LoadWithoutTarget skip{label - label % V::L, label % V::L, r.n_full};

    // Sweeps 1 and 2 over the non-target entries: maxima, then the exponentials (kept for sweep
    // 3), their sums and the NCKD numerator.
    C ms, mt;
    row_max2(s, t, r, ms, mt, skip);
    const ExpSums tot = exp_sweep<V, true, true>(s, t, r, ms, mt, inv_t, false,
                                                 ExpRows<C, TS, TT>::with_next(exp_s, exp_t, s, t, n, row + 1 == row_end), skip);

    // The row's loss, in double (see the top).
    const double log_ss = std::log(tot.s), log_st = std::log(tot.t);
    double nckd = tot.num / tot.t + log_ss - log_st;
    nckd = nckd < 0 ? 0 : nckd;  // KL >= 0; rounding can leave -1e-16 when p^ == q^ (NaN kept)
    const double d_s = (double(to_compute<C>(s[label])) - double(ms)) * a.inv_temperature - log_ss;
    const double d_t = (double(to_compute<C>(t[label])) - double(mt)) * a.inv_temperature - log_st;
    double tckd = binary_kl(d_t, d_s);
    tckd = tckd < 0 ? 0 : tckd;
    a.row_loss[row] = a.tckd_loss_coef * tckd + a.nckd_loss_coef * nckd;
    if (!g) return;

    // Sweep 3: the gradient from the kept exponentials; the target's entry is written last.
    const double dq = sigmoid_difference(d_s, d_t);  // q_y - p_y
    const double rs = row_factor(a.grad_row_scale, row);
    const double alpha_coef = a.alpha_grad_coef * rs, beta_coef = a.beta_grad_coef * rs;
    const V vcq = V::set1(C((beta_coef - alpha_coef * dq) / tot.s));
    const V vcp = V::set1(C(-beta_coef / tot.t));
    write_grad_row(g, r, a.stream_grad,
                   [&](int64_t i, auto) { return V::fma(vcp, V::load(exp_t + i), vcq * V::load(exp_s + i)); });
    g[label] = from_compute<TS>(C(alpha_coef * dq));
  });
}

FASTKD_ROWS_ENTRY(dkd_rows, DkdArgs, dkd_rows)
