// Fused KD with the other divergences, and with an ensemble of teachers, on the CPU: one row's
// loss and gradient, generic over the vector type. Compiled per instruction set like
// kd_kernel.h (whose helpers it uses); the plain one-teacher forward KL stays in kd_kernel.h.
//
// Math, per row, with a = s/T, q = softmax(a) (student) and p = softmax(t/T) (teacher), or for
// an ensemble p = sum_m w_m softmax(t_m/T). Every divergence L(p, q) has, by the softmax
// Jacobian, the gradient
//
//   dL/da_j = q_j (g_j - sum_i q_i g_i),    g = dL/dq,
//
// so the kernel computes per entry x_j = g_j / k (up to a constant that cancels) and the row
// statistic c = sum_i q_i x_i, then grad_j = k q_j (x_j - c):
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
//   kl (ensemble)     sum p (lp - lq)                    (grad = q - p directly)
//
// (sign(0) = 0: TVD's subgradient at p = q is 0.) The gradient w.r.t. s is (1/T) dL/da, times
// T^2 with t2_scale: soft_grad_coef already holds (1 - hard_weight) (T or 1/T) (reduction scale).
//
// Logarithms are never taken of probabilities that may have underflowed:
//   lq = (s - ms)/T - log S_s and, for one teacher, lp = (t - mt)/T - log S_t, exactly;
//   log m = logaddexp(A, B) = max(A, B) + log(1 + exp(-|A - B|)) with A, B = log b + lp,
//   log(1-b) + lq (or the other way round), so a row whose log-probabilities fall below -104
//   (where float32 probabilities are 0) keeps finite, correct terms;
//   for an ensemble, lp = log(sum_m w_m e_m / S_m) where that sum is at least 2^-96 (each e_m
//   has full relative precision down to exp's underflow at 2^-126, so the missing mass is below
//   1e-9 relative), else, where such a p meets a nonzero q, the exact
//   logsumexp_m(log w_m - log S_m + (t_m - mt_m)/T) from the teachers' logits.
// An entry where p and q are both 0 (masked vocabulary: -inf in both) contributes 0 and gets a
// zero gradient: every term is weighted by p or q through zero_where_zero, so its NaN
// intermediates (-inf - -inf) are dropped. A NaN logit in a valid row makes S_s or S_t NaN and
// the whole row NaN.
//
// The skews' ratios p/m and q/m come from logaddexp's own exp (see logaddexp), so every
// divergence needs at most one exp and one log per entry beyond the softmaxes' exps.
//
// Sweeps, one teacher: (1) maxima of s and t; (2) e_s, e_t into the per-thread scratch, and
// their sums (the next row is prefetched meanwhile); (3) statistics: s and t re-read from
// cache with e_s, e_t; x_j written over e_t; (4) the gradient from e_s and x.
// Ensemble: (1-2) for s alone; then per teacher m: its maximum, e_m into a scratch row with its
// sum S_m, and P += (w_m / S_m) e_m (the next teacher's row is prefetched during this one); (3)
// statistics from e_s and P (x written over P); (4) as before.
// Memory traffic: read (M+1)·N·V, write N·V (the gradient, non-temporal when it outgrows the
// caches); the scratch rows stay in L2/L3. Transcendentals per entry: one teacher, 2 exp
// (reverse_kl, tvd), 3 exp + 1 log (jsd, skew_kl, skew_reverse_kl); an ensemble adds M - 1 exp
// and 1 log.
#pragma once

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
  C beta, log_b, log_1mb;  // b, log b, log(1 - b) (0 where unused)
};

// One vector of entries: the loss term t1 (see kd_div_loss), x, and c's term q x.
template <class V>
static inline void div_entry(const DivConsts<typename V::scalar>& k, V q, V lq, V p, V lp, V& t1, V& x) {
  using C = typename V::scalar;
  switch (k.d) {
    case Divergence::KL:
      x = p;
      t1 = V::zero_where_zero(p, p * (lp - lq));
      break;
    case Divergence::ReverseKL:
      x = lq - lp;
      t1 = V::set1(C(0));
      break;
    case Divergence::JSD: {
      V e;
      const V lm = logaddexp(V::set1(k.log_b) + lp, V::set1(k.log_1mb) + lq, e);
      x = lq - lm;
      t1 = V::zero_where_zero(p, p * (lp - lm));
      break;
    }
    case Divergence::TVD: {
      const V d = q - p;
      x = V::sign(d);
      t1 = V::abs(d);
      break;
    }
    case Divergence::SkewKL: {
      // m = b p + (1-b) q; p/m = (A >= B ? 1 : e) / (b (1 + e)), A = log b + lp, B = log(1-b) + lq.
      const V a = V::set1(k.log_b) + lp, bb = V::set1(k.log_1mb) + lq;
      V e;
      const V lm = logaddexp(a, bb, e);
      const V one = V::set1(C(1));
      x = V::set1(C(0)) - V::where_neg(a - bb, e, one) / (V::set1(k.beta) * (one + e));
      t1 = V::zero_where_zero(p, p * (lp - lm));
      break;
    }
    case Divergence::SkewReverseKL: {
      // m = (1-b) p + b q; q/m = (B >= A ? 1 : e) / (b (1 + e)), A = log(1-b) + lp, B = log b + lq.
      const V a = V::set1(k.log_1mb) + lp, bb = V::set1(k.log_b) + lq;
      V e;
      const V lm = logaddexp(a, bb, e);
      const V one = V::set1(C(1));
      const V d = lq - lm;
      x = d - V::where_neg(bb - a, e, one) / (one + e);
      t1 = V::zero_where_zero(q, q * d);
      break;
    }
  }
}

// The row's divergence from the statistics' totals (acc1 = sum t1, accc = sum q x).
static inline double kd_div_loss(Divergence d, double beta, double acc1, double accc) {
  double loss = 0;
  switch (d) {
    case Divergence::KL: loss = acc1; break;
    case Divergence::ReverseKL: loss = accc; break;
    case Divergence::JSD: loss = beta * acc1 + (1 - beta) * accc; break;
    case Divergence::TVD: loss = 0.5 * acc1; break;
    case Divergence::SkewKL: loss = acc1; break;
    case Divergence::SkewReverseKL: loss = acc1; break;
  }
  return loss < 0 ? 0 : loss;  // every one is >= 0; rounding can leave -1e-16 at p == q (NaN kept)
}

// The factor k of the gradient k q (x - c).
static inline double kd_div_grad_factor(Divergence d, double beta) {
  switch (d) {
    case Divergence::JSD:
    case Divergence::SkewKL: return 1 - beta;
    case Divergence::TVD: return 0.5;
    default: return 1;
  }
}

// exp((x - mx) * it) of a row into e (tail lanes: 0), returning the sum in double; prefetches
// the row `next` (if not null) meanwhile.
template <class V, class T, class TN>
static double exp_row(const T* x, int64_t n_full, int64_t n_tail, typename V::scalar mx, typename V::scalar it,
                      typename V::scalar* e, const TN* next) {
  using C = typename V::scalar;
  constexpr int L = V::L;
  constexpr int64_t kBlock = 64 * L;
  const V vm = V::set1(mx), vit = V::set1(it);
  double total = 0;
  for (int64_t b = 0; b < n_full; b += kBlock) {
    const int64_t end = std::min(b + kBlock, n_full);
    V sum = V::set1(C(0));
    for (int64_t i = b; i < end; i += L) {
      if (next) __builtin_prefetch(next + i, 0, 2);
      const V ev = V::exp((V::load(x + i) - vm) * vit);
      ev.store(e + i);
      sum = sum + ev;
    }
    total += double(sum.sum());
  }
  if (n_tail) {
    const V ev = V::exp((load_tail<V>(x + n_full, n_tail, -std::numeric_limits<C>::infinity()) - vm) * vit);
    ev.store(e + n_full);
    total += double(ev.sum());
  }
  return total;
}

template <class V, class T>
static typename V::scalar row_max(const T* x, int64_t n_full, int64_t n_tail) {
  using C = typename V::scalar;
  constexpr int L = V::L;
  const C neg_inf = -std::numeric_limits<C>::infinity();
  V mx = V::set1(neg_inf);
  for (int64_t i = 0; i < n_full; i += L) mx = V::max(mx, V::load(x + i));
  if (n_tail) mx = V::max(mx, load_tail<V>(x + n_full, n_tail, neg_inf));
  return mx.max();
}

// MIX: the teacher is an ensemble (n_teachers > 1).
template <class V, class TS, class TT, bool MIX>
static void kd_div_rows(const KdArgs& a, int64_t row_begin, int64_t row_end, void* scratch) {
  using C = typename V::scalar;
  constexpr int L = V::L;
  constexpr int64_t kBlock = 64 * L;
  const int64_t n = a.vocab;
  const int64_t n_full = n - n % L;
  const int64_t n_tail = n - n_full;
  const int64_t M = a.n_teachers;
  const int64_t teacher_stride = a.n_rows * n;
  const C neg_inf = -std::numeric_limits<C>::infinity();
  const C inv_t = C(a.inv_temperature);
  const V vit = V::set1(inv_t);
  const bool hard = a.hard_weight > 0;
  const bool ce_needs_own_sum = hard && a.inv_temperature != 1;
  const Divergence dv = a.divergence;
  const bool kl_form = dv == Divergence::KL;
  DivConsts<C> k{dv, C(a.beta), C(0), C(0)};
  if (dv == Divergence::JSD || dv == Divergence::SkewKL || dv == Divergence::SkewReverseKL) {
    k.log_b = C(std::log(a.beta));
    k.log_1mb = C(std::log1p(-a.beta));
  }
  // Below this a mixture probability may have lost terms to exp's underflow (see the top).
  const C exact_below = std::is_same_v<C, double> ? C(0x1p-960) : C(0x1p-96);

  const size_t row_bytes = kd_div_row_bytes(n, sizeof(C));
  char* base = static_cast<char*>(scratch);
  C* const exp_s = reinterpret_cast<C*>(base);
  C* const xrow = reinterpret_cast<C*>(base + row_bytes);  // e_t (one teacher) or P (ensemble), then x
  C* const erow = reinterpret_cast<C*>(base + 2 * row_bytes);  // ensemble: e_m of one teacher
  double* const t_max = reinterpret_cast<double*>(base + (MIX ? 3 : 2) * row_bytes);
  double* const t_logc = t_max + M;  // log w_m - log S_m
  double* const t_w = t_logc + M;

  for (int64_t m = 0; m < M; ++m) t_w[m] = a.teacher_weights ? a.teacher_weights[m] : 1.0 / double(M);

  for (int64_t row = row_begin; row < row_end; ++row) {
    const TS* s = static_cast<const TS*>(a.student) + row * n;
    const TT* t = static_cast<const TT*>(a.teacher) + row * n;  // teacher 0; teacher m at + m * teacher_stride
    TS* g = a.grad ? static_cast<TS*>(a.grad) + row * n : nullptr;
    const int64_t label = a.labels ? a.labels[row] : -1;
    if (a.labels && label == a.ignore_index) {
      a.row_loss[row] = 0;
      if (g) fill_row(g, n, 0.f);
      continue;
    }
    if (a.labels && (label < 0 || label >= n)) {
      a.row_loss[row] = std::numeric_limits<double>::quiet_NaN();
      if (g) fill_row(g, n, std::numeric_limits<float>::quiet_NaN());
      continue;
    }
    const bool prefetch = row + 1 < row_end;

    // Sweeps 1-2, the student (with the teacher, for one teacher).
    C ms, mt = 0;
    double tot_s = 0, tot_t = 0, tot_ce = 0;
    if constexpr (!MIX) {
      V mx_s = V::set1(neg_inf), mx_t = V::set1(neg_inf);
      for (int64_t i = 0; i < n_full; i += L) {
        mx_s = V::max(mx_s, V::load(s + i));
        mx_t = V::max(mx_t, V::load(t + i));
      }
      if (n_tail) {
        mx_s = V::max(mx_s, load_tail<V>(s + n_full, n_tail, neg_inf));
        mx_t = V::max(mx_t, load_tail<V>(t + n_full, n_tail, neg_inf));
      }
      ms = mx_s.max();
      mt = mx_t.max();
    } else {
      ms = row_max<V>(s, n_full, n_tail);
    }
    {
      const V vms = V::set1(ms), vmt = V::set1(mt);
      V sum_s = V::set1(C(0)), sum_t = V::set1(C(0)), sum_ce = V::set1(C(0));
      auto sweep2 = [&](V xs, const TT* tp, int64_t i, bool tail) {
        const V ds = xs - vms;
        const V es = V::exp(ds * vit);
        es.store(exp_s + i);
        sum_s = sum_s + es;
        if (ce_needs_own_sum) sum_ce = sum_ce + V::exp(ds);
        if constexpr (!MIX) {
          const V xt = tail ? load_tail<V>(tp, n_tail, neg_inf) : V::load(tp);
          const V et = V::exp((xt - vmt) * vit);
          et.store(xrow + i);
          sum_t = sum_t + et;
        }
      };
      auto flush = [&] {
        tot_s += double(sum_s.sum()), tot_t += double(sum_t.sum());
        sum_s = sum_t = V::set1(C(0));
        if (ce_needs_own_sum) tot_ce += double(sum_ce.sum()), sum_ce = V::set1(C(0));
      };
      // One teacher: the next row is fetched now; an ensemble fetches teacher 0 of this row.
      const TS* next_s = MIX ? nullptr : (prefetch ? s + n : nullptr);
      const TT* next_t = MIX ? t : (prefetch ? t + n : nullptr);
      for (int64_t b = 0; b < n_full; b += kBlock) {
        const int64_t e = std::min(b + kBlock, n_full);
        for (int64_t i = b; i < e; i += L) {
          if (next_s) __builtin_prefetch(next_s + i, 0, 2);
          if (next_t) __builtin_prefetch(next_t + i, 0, 2);
          sweep2(V::load(s + i), t + i, i, false);
        }
        flush();
      }
      if (n_tail) {
        sweep2(load_tail<V>(s + n_full, n_tail, neg_inf), t + n_full, n_full, true);
        flush();
      }
    }

    // Ensemble: each teacher's softmax, added into P with its weight.
    if constexpr (MIX) {
      for (int64_t m = 0; m < M; ++m) {
        const TT* tm = t + m * teacher_stride;
        const TT* next_t = m + 1 < M ? tm + teacher_stride : nullptr;
        const TS* next_s = m + 1 == M && prefetch ? s + n : nullptr;
        const C mx = row_max<V>(tm, n_full, n_tail);
        const double sm = next_t ? exp_row<V>(tm, n_full, n_tail, mx, inv_t, erow, next_t)
                                 : exp_row<V>(tm, n_full, n_tail, mx, inv_t, erow, next_s);
        t_max[m] = double(mx);
        t_logc[m] = std::log(t_w[m]) - std::log(sm);
        const V c = V::set1(C(t_w[m] / sm));
        const int64_t len = n_full + (n_tail ? L : 0);
        if (m == 0) {
          for (int64_t i = 0; i < len; i += L) (c * V::load(erow + i)).store(xrow + i);
        } else {
          for (int64_t i = 0; i < len; i += L) V::fma(c, V::load(erow + i), V::load(xrow + i)).store(xrow + i);
        }
      }
    }

    // Sweep 3: statistics; x written over e_t / P.
    const C inv_ss = C(1 / tot_s);
    const C log_ss = C(std::log(tot_s));
    const V vinv_ss = V::set1(inv_ss), vms_l = V::set1(ms);
    const V vinv_st = V::set1(C(1 / tot_t)), vmt_l = V::set1(mt), vlog_st = V::set1(C(std::log(tot_t)));
    const V vlog_ss = V::set1(log_ss);
    V acc1 = V::set1(C(0)), accc = V::set1(C(0));
    double tot1 = 0, totc = 0;
    // The exact log of the mixture at entries [i, i + L) (see the top).
    auto exact_lp = [&](int64_t i, bool tail) {
      V best = V::set1(neg_inf);
      for (int64_t m = 0; m < M; ++m) {
        const TT* tm = t + m * teacher_stride + i;
        const V xt = tail ? load_tail<V>(tm, n_tail, neg_inf) : V::load(tm);
        best = V::max(best, V::set1(C(t_logc[m])) + (xt - V::set1(C(t_max[m]))) * vit);
      }
      V sum = V::set1(C(0));
      for (int64_t m = 0; m < M; ++m) {
        const TT* tm = t + m * teacher_stride + i;
        const V xt = tail ? load_tail<V>(tm, n_tail, neg_inf) : V::load(tm);
        sum = sum + V::exp(V::set1(C(t_logc[m])) + (xt - V::set1(C(t_max[m]))) * vit - best);
      }
      return best + V::log(sum);
    };
    auto sweep3 = [&](V xs, int64_t i, bool tail) {
      const V q = V::load(exp_s + i) * vinv_ss;
      const V lq = (xs - vms_l) * vit - vlog_ss;
      V p, lp;
      if constexpr (MIX) {
        p = V::load(xrow + i);
        lp = V::any_below_where(p, exact_below, q) ? exact_lp(i, tail) : V::log(p);
      } else {
        const V xt = tail ? load_tail<V>(t + i, n_tail, neg_inf) : V::load(t + i);
        p = V::load(xrow + i) * vinv_st;
        lp = (xt - vmt_l) * vit - vlog_st;
      }
      V t1, x;
      div_entry<V>(k, q, lq, p, lp, t1, x);
      x.store(xrow + i);
      acc1 = acc1 + t1;
      if (!kl_form) accc = accc + V::zero_where_zero(q, q * x);
    };
    for (int64_t b = 0; b < n_full; b += kBlock) {
      const int64_t e = std::min(b + kBlock, n_full);
      for (int64_t i = b; i < e; i += L) sweep3(V::load(s + i), i, false);
      tot1 += double(acc1.sum()), totc += double(accc.sum());
      acc1 = accc = V::set1(C(0));
    }
    if (n_tail) {
      sweep3(load_tail<V>(s + n_full, n_tail, neg_inf), n_full, true);
      tot1 += double(acc1.sum()), totc += double(accc.sum());
    }

    double loss = 0;
    if (a.soft_loss_coef != 0) loss += a.soft_loss_coef * kd_div_loss(dv, a.beta, tot1, totc);
    if (hard) loss += a.hard_weight * (double(ms) + std::log(ce_needs_own_sum ? tot_ce : tot_s) - double(to_compute<C>(s[label])));
    a.row_loss[row] = loss;
    if (!g) continue;

    // Sweep 4: the gradient, k q (x - c) (kl: k (q - p)) plus the CE's softmax; with T == 1 the
    // CE softmax is q itself.
    const double rs = row_factor(a.grad_row_scale, row);
    const C ks = C(a.soft_grad_coef * rs * kd_div_grad_factor(dv, a.beta));
    const C c = kl_form ? C(0) : C(totc);
    const C hard_coef = C(a.hard_grad_coef * rs);
    const C cq_ce = hard && !ce_needs_own_sum ? hard_coef : C(0);  // times q, already normalised
    const C cce = ce_needs_own_sum ? C(a.hard_grad_coef * rs / tot_ce) : C(0);
    const V vks = V::set1(ks), vc = V::set1(c), vcq_ce = V::set1(cq_ce), vcce = V::set1(cce), vms = V::set1(ms);
    auto sweep4 = [&](int64_t i, V xs) {
      const V q = V::load(exp_s + i) * vinv_ss;
      const V x = V::load(xrow + i);
      V r = kl_form ? vks * (q - x) : vks * V::zero_where_zero(q, q * (x - vc));
      if (hard && !ce_needs_own_sum) r = V::fma(vcq_ce, q, r);
      if (ce_needs_own_sum) r = V::fma(vcce, V::exp(xs - vms), r);
      return r;
    };
    const bool stream = a.stream_grad && reinterpret_cast<uintptr_t>(g) % (L * sizeof(TS)) == 0;
    if (stream) {
      for (int64_t i = 0; i < n_full; i += L) sweep4(i, ce_needs_own_sum ? V::load(s + i) : vms).stream(g + i);
    } else {
      for (int64_t i = 0; i < n_full; i += L) sweep4(i, ce_needs_own_sum ? V::load(s + i) : vms).store(g + i);
    }
    if (n_tail) store_tail(sweep4(n_full, load_tail<V>(s + n_full, n_tail, neg_inf)), g + n_full, n_tail);
    if (stream) V::fence();
    if (hard) {
      // The one-hot term, at the label only, written once.
      const C q = exp_s[label] * inv_ss, x = xrow[label];
      C gl = kl_form ? ks * (q - x) : (q == C(0) ? C(0) : ks * q * (x - c));
      gl += cq_ce * q + cce * std::exp(to_compute<C>(s[label]) - ms) - hard_coef;
      g[label] = from_compute<TS>(gl);
    }
  }
}

// The entry point: every storage-type pair, float64 input computing in double.
void kd_div_rows(const KdArgs& a, int64_t begin, int64_t end, void* scratch) {
  with_storage(a.student_dtype, a.teacher_dtype, [&](auto s, auto t) {
    using TS = typename decltype(s)::type;
    using TT = typename decltype(t)::type;
    if (a.n_teachers > 1) {
      kd_div_rows<VecFor<TS, TT>, TS, TT, true>(a, begin, end, scratch);
    } else {
      kd_div_rows<VecFor<TS, TT>, TS, TT, false>(a, begin, end, scratch);
    }
  });
}
