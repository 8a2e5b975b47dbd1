// Fused sparse-teacher KD on the CPU: one row's loss and gradient, generic over the vector type;
// built from the shared row sweep (softmax_rows.h). Math: docs/design.md#sparse-kd.
//
// The teacher is known at k entries K = {idx_1..idx_k} of a row of V: values v_i (logits or
// log-probabilities). With s the student row, T the temperature:
//
//   student   x_j = (s_j - ms)/T, ms = max s,  S = sum_j e^{x_j},  log q_j = x_j - log S
//             (over the FULL vocabulary: the student is never normalised over K)
//   teacher   tail="renormalize":  p_i = e^{v_i/T} / sum_K e^{v/T}, and p_j = 0 off K
//             tail="uniform" (v are full-vocabulary log-probabilities): the missing mass
//             m_tail = max(0, 1 - sum_K e^{v_i}) is spread evenly over the n = V - k other
//             entries, u = log(m_tail / n); then p is proportional to e^{lp/T} over the whole
//             row (lp = v on K, u elsewhere): with top = max(v, u),
//             log Z = top/T + lz,  lz = log(sum_K e^{(v_i - top)/T} + n e^{(u - top)/T}),
//             p_i = e^{(v_i - top)/T - lz},  p_b = e^{(u - top)/T - lz} (each tail entry).
//             An empty tail (k = V, or a kept mass of 1) carries no mass: p_b = 0.
//
//   KL(p || q) = sum_j p_j (log p_j - log q_j), and since sum_j p_j = 1:
//              = sum_K p_i ((v_i - top) - (s_i - ms)) / T
//                + p_b (n (u - top) - sum_{j not in K} (s_j - ms)) / T  +  log S - lz
//   (kd_kernel.h's form: differences taken before scaling, log S - lz subtracted last), where
//   the tail's student sum needs no membership test while streaming the row:
//              sum_{j not in K} (s_j - ms) = sum_all (s_j - ms) - sum_K (s_j - ms).
//   (A term with p = 0 is 0, not 0 * inf: a -inf value, or an empty tail facing a -inf student
//   entry. A -inf student entry in a tail of positive mass makes the loss +inf, as it should.)
//
//   Gradient w.r.t. s_j, before the T^2 scaling: dKL/ds_j = (q_j - p_j)/T over the full row:
//   the teacher is a constant and sum_j p_j = 1 (d log S / ds_j = q_j / T, d x_i / ds_j = [i=j]/T).
//   So the gradient is the dense kd_loss one with p_j = p_i on K and p_b (0 for "renormalize")
//   elsewhere:  grad = soft_grad_coef (q - p) + hard_grad_coef (softmax(s) - onehot(label)).
//   CE (temperature 1, labels and hard_weight > 0) = ms + log sum e^{s - ms} - s[label].
//
// Per row: (0) the k indices are checked (in [0, V), distinct: a stamp per vocabulary entry
// records the last row that kept it), a bad row gets a NaN loss and gradient; (1) max of s (the
// row was prefetched while the previous one was computed); (2) e^{x_j} into a per-thread scratch
// row, S, and sum (s_j - ms) for the uniform tail; (3) the teacher's k entries in double;
// (4) the gradient, one streaming sweep g = c_q (e - c_e), the tail's value off the kept entries:
// each kept entry's own value is folded into the scratch row beforehand, so that no scattered
// store follows the non-temporal ones (only the label's, as in kd_kernel.h). Memory traffic:
// read N*V + 2*N*k, write N*V; for V = 32000 fp32 a row and its exponentials fill 256 KB, inside
// a core's L2.
// One exp per entry (two with labels and T != 1).
#pragma once

#include "cpu/softmax_rows.h"
#include "sparse_kd_args.h"

// One teacher value as double, one index as int64, whatever their storage.
static inline double sparse_value(const SparseKdArgs& a, int64_t pos) {
  switch (a.values_dtype) {
    case DType::Float32: return static_cast<const float*>(a.values)[pos];
    case DType::BFloat16: return to_float(static_cast<const bf16_t*>(a.values)[pos]);
    case DType::Float16: return to_float(static_cast<const f16_t*>(a.values)[pos]);
    case DType::Float64: return static_cast<const double*>(a.values)[pos];
  }
  return std::numeric_limits<double>::quiet_NaN();
}

static inline int64_t sparse_index(const SparseKdArgs& a, int64_t pos) {
  return a.indices_int32 ? int64_t(static_cast<const int32_t*>(a.indices)[pos]) : static_cast<const int64_t*>(a.indices)[pos];
}

// scratch: sparse_kd_scratch_bytes(vocab, sizeof(compute type)), owned by the calling thread.
template <class V, class TS>
static void sparse_kd_rows(const SparseKdArgs& a, int64_t row_begin, int64_t row_end, void* scratch) {
  using C = typename V::scalar;
  const int64_t n = a.vocab;
  const int64_t k = a.k;
  const RowShape<V> r(n);
  const int64_t n_rest = n - k;  // entries not kept: the uniform tail's size
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  const C neg_inf = -std::numeric_limits<C>::infinity();
  const C inv_t = C(a.inv_temperature);
  const double inv_td = a.inv_temperature;
  const bool hard = a.hard_weight > 0;
  const bool ce_needs_own_sum = hard && a.inv_temperature != 1;
  const bool uniform = a.uniform_tail;
  C* const exp_s = static_cast<C*>(scratch);
  int64_t* const stamp = reinterpret_cast<int64_t*>(static_cast<char*>(scratch) + sparse_kd_exp_bytes(n, sizeof(C)));
  std::fill(stamp, stamp + n, int64_t(-1));

  for (int64_t row = row_begin; row < row_end; ++row) {
    const TS* s = static_cast<const TS*>(a.student) + row * n;
    TS* g = a.grad ? static_cast<TS*>(a.grad) + row * n : nullptr;
    const int64_t base = row * k;
    if (!row_is_live(a.labels, a.ignore_index, row, n, a.row_loss, g)) continue;
    const int64_t label = a.labels ? a.labels[row] : -1;
    // Indices outside [0, V) or repeated: the row fails (the Python wrapper raises before on CPU).
    bool bad = false;
    for (int64_t i = 0; i < k && !bad; ++i) {
      const int64_t j = sparse_index(a, base + i);
      bad = j < 0 || j >= n || stamp[j] == row;
      if (!bad) stamp[j] = row;
    }
    if (bad) {
      fail_row(a.row_loss, row, g, n);
      continue;
    }

    // Sweep 1: the student's maximum.
    const C ms = row_max(s, r);
    const V vms = V::set1(ms), vit = V::set1(inv_t), zero = V::set1(C(0));

    // Sweep 2: exponentials (kept for sweep 4), their sum, sum (s - ms) for the uniform tail, and
    // the temperature-1 sum for the CE.
    V sum_s = zero, sum_d = zero, sum_ce = zero;
    double tot_s = 0, tot_d = 0, tot_ce = 0;
    const bool prefetch = row + 1 < row_end;
    auto step = [&](int64_t i, auto part) {
      constexpr bool full = std::is_same_v<decltype(part), FullVec>;
      if (full && prefetch) __builtin_prefetch(s + n + i, 0, 2);
      const V ds = load_part<V>(s + i, part) - vms;
      const V es = V::exp(ds * vit);
      es.store(exp_s + i);
      sum_s = sum_s + es;
      // The tail's padding lanes hold -inf: their exponentials are 0, but they must not enter
      // sum (s - ms); the tail's entries are added one by one below.
      if (full && uniform) sum_d = sum_d + ds;
      if (ce_needs_own_sum) sum_ce = sum_ce + V::exp(ds);
    };
    blocked_sweep(r, step, [&] {
      tot_s += double(sum_s.sum());
      sum_s = zero;
      if (uniform) tot_d += double(sum_d.sum()), sum_d = zero;
      if (ce_needs_own_sum) tot_ce += double(sum_ce.sum()), sum_ce = zero;
    });
    if (uniform)
      for (int64_t j = r.n_full; j < n; ++j) tot_d += double(C(to_compute<C>(s[j]) - ms));
    const double log_s = std::log(tot_s);

    // The teacher, in double, in the values' own units (differences are taken before scaling by
    // 1/T, so that the largest entry's log-probability is exactly 0 - lz): its maximum mv (NaN
    // kept), the uniform tail's log-probability ub, and log Z = mv / T + lz.
    double mv = -inf, mass = 0;
    bool teacher_nan = false;
    for (int64_t i = 0; i < k; ++i) {
      const double v = sparse_value(a, base + i);
      if (v != v) teacher_nan = true;
      else if (v > mv) mv = v;
      if (uniform) mass += std::exp(v);
    }
    if (teacher_nan) mv = nan;
    double tail_mass = 1.0 - mass;  // NaN stays NaN
    if (tail_mass < 0) tail_mass = 0;  // a kept mass of 1 up to rounding: an empty tail
    const bool has_tail = uniform && n_rest > 0 && tail_mass != 0;
    const double ub = has_tail ? std::log(tail_mass / double(n_rest)) : -inf;
    const double top = has_tail && !(ub <= mv) ? ub : mv;  // NaN-propagating max(mv, ub)
    double z = has_tail ? double(n_rest) * std::exp((ub - top) * inv_td) : 0.0;
    for (int64_t i = 0; i < k; ++i) z += std::exp((sparse_value(a, base + i) - top) * inv_td);
    const double lz = std::log(z);
    auto log_p = [&](double v) { return (v - top) * inv_td - lz; };
    const double pb = has_tail ? std::exp(log_p(ub)) : 0.0;

    // Gradient: g = cq (e - ce) (+ cce e^{s - ms}), e = e^{x}, ce = S p_b soft / (cq S): the tail's
    // value soft (q - p_b) off the kept entries. With T == 1 the CE softmax is q itself, so its
    // weight joins q's. A kept entry's own value, cq e_j - soft p_j, is folded into its
    // exponential: e_j <- e_j - ratio S p_j + ce, ratio = soft / (cq S); an entry where q and p are
    // both 0 (student and teacher -inf) thus gets ce itself, and a gradient of exactly 0.
    const GradCoefs gc = grad_coefs(a, row);
    const double soft = gc.soft, hard_coef = gc.hard;
    const double q_coef = soft + (hard && !ce_needs_own_sum ? hard_coef : 0.0);
    const double ratio = soft != 0 ? soft / q_coef : 0.0;
    const double ce_d = ratio * tot_s * pb;
    const C cq = C(q_coef / tot_s);
    const C ce = C(ce_d);
    const C cce = ce_needs_own_sum ? C(hard_coef / tot_ce) : C(0);
    const bool fold = g && soft != 0;

    // The kept entries: the loss terms, sum (s - ms) over K, the fold. As in kd_kernel.h the KL is
    // sum_j p_j ((v_j - top) - (s_j - ms)) / T + log S - lz (v_j = ub off K; sum_j p_j = 1): each
    // term a difference taken before scaling, and log S - lz, both near log V, subtracted last.
    double kept = 0, kept_d = 0;
    bool kept_neg_inf = false;
    for (int64_t i = 0; i < k; ++i) {
      const int64_t j = sparse_index(a, base + i);
      const double v = sparse_value(a, base + i);
      const double p = std::exp(log_p(v));
      const C dj = to_compute<C>(s[j]) - ms;
      if (p != 0) kept += p * (((v - top) - double(dj)) * inv_td);  // NaN fails p == 0: kept
      if (dj == neg_inf) kept_neg_inf = true;
      else kept_d += double(dj);
      if (fold) exp_s[j] = C((double(exp_s[j]) - ratio * tot_s * p) + ce_d);
    }
    if (has_tail && pb != 0) {
      double tail_d;  // sum over the entries not kept of (s_j - ms)
      if (!kept_neg_inf) {
        tail_d = tot_d - kept_d;  // -inf exactly when a tail entry is -inf
      } else {
        // A -inf student entry among the kept ones: -inf - -inf is undefined, so sum the tail
        // itself, telling kept from not by the stamps (rare: masked vocabulary entries kept).
        tail_d = 0;
        for (int64_t j = 0; j < n; ++j)
          if (stamp[j] != row) tail_d += double(C(to_compute<C>(s[j]) - ms));
      }
      kept += pb * ((double(n_rest) * (ub - top) - tail_d) * inv_td);
    }
    double kl = (kept + log_s) - lz;

    // The row's loss, combined in double (see kd_kernel.h).
    double loss = 0;
    if (a.soft_loss_coef != 0) {
      kl = kl < 0 ? 0 : kl;  // KL >= 0; rounding can leave -1e-16 when p == q (NaN kept)
      loss += a.soft_loss_coef * kl;
    }
    if (hard) loss += a.hard_weight * row_cross_entropy(ms, ce_needs_own_sum ? tot_ce : tot_s, s, label);
    a.row_loss[row] = loss;
    if (!g) continue;

    // Sweep 4: the gradient.
    const V vcq = V::set1(cq), vce = V::set1(ce), vcce = V::set1(cce);
    write_grad_row(g, r, a.stream_grad, [&](int64_t i, auto part) {
      V v = (V::load(exp_s + i) - vce) * vcq;
      if (ce_needs_own_sum) v = V::fma(vcce, V::exp(load_part<V>(s + i, part) - vms), v);
      return v;
    });

    if (hard) {
      // The label's entry, written once and computed afresh in the compute type, coefficient by
      // coefficient, so that softmax(s) - onehot and q - p cancel where they should (V = 1).
      double p_label = pb;
      if (stamp[label] == row)
        for (int64_t i = 0; i < k; ++i)
          if (sparse_index(a, base + i) == label) p_label = std::exp(log_p(sparse_value(a, base + i)));
      const C d_label = to_compute<C>(s[label]) - ms;
      const C e_label = std::exp(d_label * inv_t);
      C r = C(soft / tot_s) * e_label - C(soft * p_label);
      r += ce_needs_own_sum ? cce * std::exp(d_label) : C(hard_coef / tot_s) * e_label;
      g[label] = from_compute<TS>(r - C(hard_coef));
    }
  }
}

// The entry point: every student storage type, float64 computing in double.
void sparse_kd_rows(const SparseKdArgs& a, int64_t begin, int64_t end, void* scratch) {
  with_storage(a.student_dtype, [&](auto s) {
    using TS = typename decltype(s)::type;
    using Vec = std::conditional_t<std::is_same_v<TS, double>, VecScalar<double>, VecF>;
    sparse_kd_rows<Vec, TS>(a, begin, end, scratch);
  });
}
