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
//
// Sweep 3 of a row runs inside sweep 2 of the thread's next live row, vector i of the one with
// vector i of the other: the exp sweep is compute-bound and the gradient's stores are
// memory-bound, and run one after the other the core waits on its stores between rows. So a row's
// gradient waits (KdGradRow) for the next row, and the scratch rows come in two pairs that the
// rows take in turn. Each entry's arithmetic is the same whichever row it runs beside.
#pragma once

#include "cpu/softmax_rows.h"
#include "kd_args.h"

// A row's gradient, known but not yet written: value(i, part) is sweep 3's vector i.
template <class V, class TS>
struct KdGradRow {
  using C = typename V::scalar;
  TS* g = nullptr;  // null: no row waiting
  const TS* s;
  const C* exp_s;
  const C* exp_t;
  V vcq, vcp, vcce, vms;
  bool own_ce;      // the cross-entropy's softmax has its own sum (labels and T != 1)
  int64_t label;    // -1: no one-hot term
  TS label_grad;    // g[label], written after the row

  template <class Part>
  V value(int64_t i, Part part) const {
    V v = V::fma(vcp, V::load(exp_t + i), vcq * V::load(exp_s + i));
    if (own_ce) v = V::fma(vcce, V::exp(load_part<V>(s + i, part) - vms), v);
    return v;
  }
};

// scratch: TwoRowStart's two rows, then (with a gradient) two more for the row that waits.
template <class V, class TS, class TT>
static void kd_rows(const KdArgs& a, int64_t row_begin, int64_t row_end, void* scratch) {
  using C = typename V::scalar;
  const int64_t n = a.vocab;
  const auto [r, inv_t, exp_s0, exp_t0] = TwoRowStart<V>(a, scratch);
  C* const exp_pair[2][2] = {{exp_s0, exp_t0},
                             {a.grad ? scratch_row<C>(scratch, n, 2) : nullptr, a.grad ? scratch_row<C>(scratch, n, 3) : nullptr}};
  int pair = 0;  // the scratch pair this row takes (the waiting row holds the other one)
  const bool hard = a.hard_weight > 0;
  const bool ce_needs_own_sum = hard && a.inv_temperature != 1;

  // One lane at a time (float64, the portable build) a row is all arithmetic, with nothing to
  // overlap: its gradient is written right after it. That also keeps the scalar code's shape, on
  // which the compiler's contraction of plain a * b + c into fused multiply-adds, and so the
  // float64 results' last bits, depend.
  constexpr bool kOverlap = V::L > 1;

  KdGradRow<V, TS> waiting;
  // The label's entry last: it overwrites what the row's vectors wrote there.
  auto finish = [&](const GradRowOut<V, TS>& out) {
    out.done();
    if (waiting.label >= 0) waiting.g[waiting.label] = waiting.label_grad;
    waiting.g = nullptr;
  };
  auto write_waiting = [&] {
    const GradRowOut<V, TS> out(waiting.g, a.stream_grad);
    for_each_vec(r, [&](int64_t i, auto part) { out.put(i, part, waiting.value(i, part)); });
    finish(out);
  };

  for_each_live_row<TS, TT>(a, row_begin, row_end, [&](int64_t row, const TS* s, const TT* t, TS* g) {
    const int64_t label = a.labels ? a.labels[row] : -1;
    C* const exp_s = exp_pair[pair][0];
    C* const exp_t = exp_pair[pair][1];

    C ms, mt;
    row_max2(s, t, r, ms, mt);
    // While this row is computed from cache, the next row is fetched from memory, so that
    // sweep 1 of the next row finds it in L2 and memory and arithmetic overlap; and the waiting
    // row's gradient goes out.
    const auto rows = ExpRows<C, TS, TT>::with_next(exp_s, exp_t, s, t, n, row + 1 == row_end);
    ExpSums tot;
    if (kOverlap && waiting.g) {
      const GradRowOut<V, TS> out(waiting.g, a.stream_grad);
      tot = exp_sweep<V, true, true>(s, t, r, ms, mt, inv_t, ce_needs_own_sum, rows, LoadAll{},
                                     [&](int64_t i, auto part) { out.put(i, part, waiting.value(i, part)); });
      finish(out);
    } else {
      tot = exp_sweep<V, true, true>(s, t, r, ms, mt, inv_t, ce_needs_own_sum, rows);
    }
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

    // Sweep 3's coefficients. With T == 1 the CE softmax is q itself, so its weight joins q's.
    const GradCoefs k = grad_coefs(a, row);
    const C soft_coef = C(k.soft), hard_coef = C(k.hard);
    const C cq = soft_coef / ss + (hard && !ce_needs_own_sum ? hard_coef / ss : C(0));
    const C cp = soft_coef / st;
    const C cce = ce_needs_own_sum ? hard_coef / sce : C(0);
    waiting = {g, s, exp_s, exp_t, V::set1(cq), V::set1(-cp), V::set1(cce), V::set1(ms), ce_needs_own_sum, hard ? label : -1,
               TS{}};
    if (hard) {
      // The one-hot term, at the label only, written once and formed coefficient by coefficient
      // (q - p and softmax(s) - 1 first), so that both cancel exactly where they should (V = 1)
      // whatever the coefficients (grad_output folded in makes them arbitrary).
      const C q = exp_s[label] / ss, p = exp_t[label] / st;
      const C sm = ce_needs_own_sum ? std::exp(to_compute<C>(s[label]) - ms) / sce : q;
      waiting.label_grad = from_compute<TS>(soft_coef * (q - p) + hard_coef * (sm - C(1)));
    }
    pair ^= 1;
    if (!kOverlap) write_waiting();
  });
  // The thread's last row has no next row to wait for.
  if (waiting.g) write_waiting();
}

FASTKD_ROWS_ENTRY(kd_rows, KdArgs, kd_rows)
