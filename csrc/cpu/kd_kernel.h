// Fused temperature KD on the CPU: one row's loss and gradient, generic over the vector type.
//
// Included (through kernels.h) by isa_{avx512,avx2,scalar}.cpp inside namespace fastkd::<isa>,
// after the matching vec_*.h; the same algorithm is thereby compiled once per instruction set.
//
// Math, per row, with s = student, t = teacher logits, T the temperature:
//   p = softmax(t/T), q = softmax(s/T), ms = max s, mt = max t
//   e_s = exp((s - ms)/T), e_t = exp((t - mt)/T), S_s = sum e_s, S_t = sum e_t
//   KL(p || q) = sum p (log p - log q)
//              = [sum e_t ((t - mt) - (s - ms))/T] / S_t + log S_s - log S_t
//   (the (mt - ms)/T offsets of log p and log q cancel exactly, so no large terms are
//   subtracted; an entry with e_t == 0, a -inf teacher logit, contributes 0, not 0 * inf)
//   CE = ms + log sum exp(s - ms) - s[label]            (temperature 1)
//   loss = soft_loss_coef * KL + hard_weight * CE
//   grad = soft_grad_coef * (q - p) + hard_grad_coef * (softmax(s) - onehot(label))
//
// Three sweeps over the row: (1) maxima, reading s and t (prefetched while the previous row was
// computed); (2) the exponentials, re-reading s and t from cache and keeping e_s and e_t in a
// per-thread scratch row, with their sums; (3) the gradient from the scratch row. Memory traffic:
// read 2·N·V, write N·V; for V = 32000 in fp32 a row's s, t, e_s, e_t fill 512 KB, inside a
// core's L2. Two exp evaluations per entry (three with labels and T != 1). The gradient goes out
// with non-temporal stores when it is larger than the caches, saving the read-for-ownership of
// each of its lines.
#pragma once

template <class V, class T>
static inline V load_tail(const T* p, int64_t count, typename V::scalar pad) {
  using C = typename V::scalar;
  alignas(64) C buf[V::L];
  for (int i = 0; i < V::L; ++i) buf[i] = i < count ? C(to_compute<C>(p[i])) : pad;
  return V::load(buf);
}

template <class V, class T>
static inline void store_tail(V x, T* p, int64_t count) {
  using C = typename V::scalar;
  alignas(64) C buf[V::L];
  x.store(buf);
  for (int64_t i = 0; i < count; ++i) p[i] = from_compute<T>(buf[i]);
}

template <class T>
static inline void fill_row(T* p, int64_t n, float value) {
  const T x = from_compute<T>(value);
  for (int64_t i = 0; i < n; ++i) p[i] = x;
}

// scratch: 2 * vocab entries of the compute type, owned by the calling thread.
template <class V, class TS, class TT>
static void kd_rows(const KdArgs& a, int64_t row_begin, int64_t row_end, void* scratch) {
  using C = typename V::scalar;
  constexpr int L = V::L;
  const int64_t n = a.vocab;
  const int64_t n_full = n - n % L;
  const int64_t n_tail = n - n_full;
  const C neg_inf = -std::numeric_limits<C>::infinity();
  const C inv_t = C(a.inv_temperature);
  const bool hard = a.hard_weight > 0;
  const bool ce_needs_own_sum = hard && a.inv_temperature != 1;
  C* const exp_s = static_cast<C*>(scratch);
  C* const exp_t = exp_s + n_full + L;

  for (int64_t row = row_begin; row < row_end; ++row) {
    const TS* s = static_cast<const TS*>(a.student) + row * n;
    const TT* t = static_cast<const TT*>(a.teacher) + row * n;
    TS* g = a.grad ? static_cast<TS*>(a.grad) + row * n : nullptr;
    const int64_t label = a.labels ? a.labels[row] : -1;
    if (a.labels && label == a.ignore_index) {
      a.row_loss[row] = 0;
      if (g) fill_row(g, n, 0.f);
      continue;
    }
    if (a.labels && (label < 0 || label >= n)) {
      // No exception can leave a parallel region: the row reports NaN instead.
      a.row_loss[row] = std::numeric_limits<double>::quiet_NaN();
      if (g) fill_row(g, n, std::numeric_limits<float>::quiet_NaN());
      continue;
    }

    // Sweep 1: maxima.
    V mx_s = V::set1(neg_inf), mx_t = V::set1(neg_inf);
    for (int64_t i = 0; i < n_full; i += L) {
      mx_s = V::max(mx_s, V::load(s + i));
      mx_t = V::max(mx_t, V::load(t + i));
    }
    if (n_tail) {
      mx_s = V::max(mx_s, load_tail<V>(s + n_full, n_tail, neg_inf));
      mx_t = V::max(mx_t, load_tail<V>(t + n_full, n_tail, neg_inf));
    }
    const C ms = mx_s.max(), mt = mx_t.max();
    const V vms = V::set1(ms), vmt = V::set1(mt), vit = V::set1(inv_t);

    // Sweep 2: exponentials (kept for sweep 3), softmax denominators, the KL numerator. The
    // vector accumulators are emptied into double totals every kBlock entries (64 per lane,
    // whatever the lane count), so that the rounding error of a long row's sums does not grow
    // with its length, nor with a narrower instruction set's longer runs per lane.
    V sum_s = V::set1(0), sum_t = V::set1(0), num = V::set1(0), sum_ce = V::set1(0);
    double tot_s = 0, tot_t = 0, tot_num = 0, tot_ce = 0;
    auto sweep2 = [&](V xs, V xt, int64_t i) {
      const V ds = xs - vms;
      const V ls = ds * vit, lt = (xt - vmt) * vit;
      const V es = V::exp(ls), et = V::exp(lt);
      es.store(exp_s + i);
      et.store(exp_t + i);
      sum_s = sum_s + es;
      sum_t = sum_t + et;
      num = num + V::zero_where_zero(et, et * (lt - ls));
      if (ce_needs_own_sum) sum_ce = sum_ce + V::exp(ds);
    };
    auto flush = [&] {
      tot_s += double(sum_s.sum()), tot_t += double(sum_t.sum()), tot_num += double(num.sum());
      sum_s = sum_t = num = V::set1(0);
      if (ce_needs_own_sum) tot_ce += double(sum_ce.sum()), sum_ce = V::set1(0);
    };
    constexpr int64_t kBlock = 64 * L;
    // While this row is computed from cache, the next row is fetched from memory, so that
    // sweep 1 of the next row finds it in L2 and memory and arithmetic overlap.
    const bool prefetch = row + 1 < row_end;
    for (int64_t b = 0; b < n_full; b += kBlock) {
      const int64_t e = std::min(b + kBlock, n_full);
      for (int64_t i = b; i < e; i += L) {
        if (prefetch) {
          __builtin_prefetch(s + n + i, 0, 2);
          __builtin_prefetch(t + n + i, 0, 2);
        }
        sweep2(V::load(s + i), V::load(t + i), i);
      }
      flush();
    }
    if (n_tail) {
      sweep2(load_tail<V>(s + n_full, n_tail, neg_inf), load_tail<V>(t + n_full, n_tail, neg_inf), n_full);
      flush();
    }
    const C ss = C(tot_s), st = C(tot_t);
    const C sce = ce_needs_own_sum ? C(tot_ce) : ss;

    // The row's loss is combined in double: KL is a small difference of terms of size log V, and
    // in float that subtraction alone costs more than every rounding before it.
    double loss = 0;
    if (a.soft_loss_coef != 0) {
      double kl = tot_num / tot_t + std::log(tot_s) - std::log(tot_t);
      kl = kl < 0 ? 0 : kl;  // KL >= 0; rounding can leave -1e-16 when p == q (NaN kept)
      loss += a.soft_loss_coef * kl;
    }
    if (hard) loss += a.hard_weight * (double(ms) + std::log(ce_needs_own_sum ? tot_ce : tot_s) - double(to_compute<C>(s[label])));
    a.row_loss[row] = loss;
    if (!g) continue;

    // Sweep 3: the gradient. With T == 1 the CE softmax is q itself, so its weight joins q's.
    const double rs = row_factor(a.grad_row_scale, row);
    const C soft_coef = C(a.soft_grad_coef * rs), hard_coef = C(a.hard_grad_coef * rs);
    const C cq = soft_coef / ss + (hard && !ce_needs_own_sum ? hard_coef / ss : C(0));
    const C cp = soft_coef / st;
    const C cce = ce_needs_own_sum ? hard_coef / sce : C(0);
    const V vcq = V::set1(cq), vcp = V::set1(-cp), vcce = V::set1(cce);
    auto sweep3 = [&](int64_t i, V xs) {
      V r = V::fma(vcp, V::load(exp_t + i), vcq * V::load(exp_s + i));
      if (ce_needs_own_sum) r = V::fma(vcce, V::exp(xs - vms), r);
      return r;
    };
    const bool stream = a.stream_grad && reinterpret_cast<uintptr_t>(g) % (L * sizeof(TS)) == 0;
    if (stream) {
      for (int64_t i = 0; i < n_full; i += L) sweep3(i, ce_needs_own_sum ? V::load(s + i) : vms).stream(g + i);
    } else {
      for (int64_t i = 0; i < n_full; i += L) sweep3(i, ce_needs_own_sum ? V::load(s + i) : vms).store(g + i);
    }
    if (n_tail) store_tail(sweep3(n_full, load_tail<V>(s + n_full, n_tail, neg_inf)), g + n_full, n_tail);
    if (stream) V::fence();
    if (hard) {
      // The one-hot term, at the label only, written once and formed coefficient by coefficient
      // (q - p and softmax(s) - 1 first), so that both cancel exactly where they should (V = 1)
      // whatever the coefficients (grad_output folded in makes them arbitrary).
      const C q = exp_s[label] / ss, p = exp_t[label] / st;
      const C sm = ce_needs_own_sum ? std::exp(to_compute<C>(s[label]) - ms) / sce : q;
      g[label] = from_compute<TS>(soft_coef * (q - p) + hard_coef * (sm - C(1)));
    }
  }
}

// The entry point: every storage-type pair, float64 input computing in double.
void kd_rows(const KdArgs& a, int64_t begin, int64_t end, void* scratch) {
  with_storage(a.student_dtype, a.teacher_dtype, [&](auto s, auto t) {
    using TS = typename decltype(s)::type;
    using TT = typename decltype(t)::type;
    kd_rows<VecFor<TS, TT>, TS, TT>(a, begin, end, scratch);
  });
}
