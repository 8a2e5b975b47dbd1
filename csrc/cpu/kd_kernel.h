// Fused temperature KD (forward KL, one teacher) on the CPU: one row's loss and gradient, generic
// over the vector type; built from the shared row sweep (softmax_rows.h). The other divergences
// and ensembles are divergence_kernel.h's.
//
// Math (docs/design.md#kd), per row, with s = student, t = teacher logits, T the temperature:
//   e_s = exp((s - ms)/T), e_t = exp((t - mt)/T), S_s = sum e_s, S_t = sum e_t
//   KL(p || q) = [sum e_t ((t - mt) - (s - ms))/T] / S_t + log S_s - log S_t
//   loss = soft_loss_coef * KL + hard_weight * CE,   CE at temperature 1
//   grad = soft_grad_coef * (q - p) + hard_grad_coef * (softmax(s) - onehot(label))
//
// Three sweeps over the row: (1) maxima, reading s and t (prefetched while the previous row was
// computed); (2) the exponentials, re-reading s and t from cache and keeping e_s and e_t in a
// per-thread scratch row, with their sums and the KL numerator; (3) the gradient from the scratch
// rows. Memory traffic: read 2·N·V, write N·V; for V = 32000 in fp32 a row's s, t, e_s, e_t fill
// 512 KB, inside a core's L2. Two exp evaluations per entry (three with labels and T != 1).
#pragma once

#include "cpu/softmax_rows.h"
#include "kd_args.h"

// scratch: TwoRowStart's two rows.
template <class V, class TS, class TT>
static void kd_rows(const KdArgs& a, int64_t row_begin, int64_t row_end, void* scratch) {
  using C = typename V::scalar;
  const int64_t n = a.vocab;
  const auto [r, inv_t, exp_s, exp_t] = TwoRowStart<V>(a, scratch);
  const bool hard = a.hard_weight > 0;
  const bool ce_needs_own_sum = hard && a.inv_temperature != 1;

  for_each_live_row<TS, TT>(a, row_begin, row_end, [&](int64_t row, const TS* s, const TT* t, TS* g) {
    const int64_t label = a.labels ? a.labels[row] : -1;

    C ms, mt;
    row_max2(s, t, r, ms, mt);
    // While this row is computed from cache, the next row is fetched from memory, so that
    // sweep 1 of the next row finds it in L2 and memory and arithmetic overlap.
    const ExpSums tot = exp_sweep<V, true, true>(s, t, r, ms, mt, inv_t, ce_needs_own_sum,
                                                 ExpRows<C, TS, TT>::with_next(exp_s, exp_t, s, t, n, row + 1 == row_end));
    const C ss = C(tot.s), st = C(tot.t);
    const C sce = ce_needs_own_sum ? C(tot.ce) : ss;

    // The row's loss is combined in double: KL is a small difference of terms of size log V, and
    // in float that subtraction alone costs more than every rounding before it.
    double loss = 0;
    if (a.soft_loss_coef != 0) {
      double kl = tot.num / tot.t + std::log(tot.s) - std::log(tot.t);
      kl = kl < 0 ? 0 : kl;  // KL >= 0; rounding can leave -1e-16 when p == q (NaN kept)
      loss += a.soft_loss_coef * kl;
    }
    if (hard) loss += a.hard_weight * row_cross_entropy(ms, ce_needs_own_sum ? tot.ce : tot.s, s, label);
    a.row_loss[row] = loss;
    if (!g) return;

    // Sweep 3: the gradient. With T == 1 the CE softmax is q itself, so its weight joins q's.
    const GradCoefs k = grad_coefs(a, row);
    const C soft_coef = C(k.soft), hard_coef = C(k.hard);
    const C cq = soft_coef / ss + (hard && !ce_needs_own_sum ? hard_coef / ss : C(0));
    const C cp = soft_coef / st;
    const C cce = ce_needs_own_sum ? hard_coef / sce : C(0);
    const V vcq = V::set1(cq), vcp = V::set1(-cp), vcce = V::set1(cce), vms = V::set1(ms);
    write_grad_row(g, r, a.stream_grad, [&](int64_t i, auto part) {
      V v = V::fma(vcp, V::load(exp_t + i), vcq * V::load(exp_s + i));
      if (ce_needs_own_sum) v = V::fma(vcce, V::exp(load_part<V>(s + i, part) - vms), v);
      return v;
    });
    if (hard) {
      // The one-hot term, at the label only, written once and formed coefficient by coefficient
      // (q - p and softmax(s) - 1 first), so that both cancel exactly where they should (V = 1)
      // whatever the coefficients (grad_output folded in makes them arbitrary).
      const C q = exp_s[label] / ss, p = exp_t[label] / st;
      const C sm = ce_needs_own_sum ? std::exp(to_compute<C>(s[label]) - ms) / sce : q;
      g[label] = from_compute<TS>(soft_coef * (q - p) + hard_coef * (sm - C(1)));
    }
  });
}

FASTKD_ROWS_ENTRY(kd_rows, KdArgs, kd_rows)
