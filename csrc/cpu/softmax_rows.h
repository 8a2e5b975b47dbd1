// The row sweep every CPU softmax kernel (kd, divergences, dkd, sparse kd) is built from,
// generic over the vector type V: the row prologue (ignored rows, bad labels), the row maxima,
// the blocked exponential sweep with its double flush, the gradient-row writer, and the
// cross-entropy and gradient-scale pieces they share (docs/design.md#online-softmax,
// #gradient-scale). Included inside namespace fastkd::<isa> (kernels.h) after the vector types.
//
// Sums. A long row's sums are kept in vector accumulators that are emptied into double totals
// every kBlock entries (64 per lane, whatever the lane count), so that their rounding error
// grows neither with the row's length nor with a narrower instruction set's longer runs per lane.
#pragma once

#include "cpu/dispatch.h"
#include "cpu/row_io.h"

// A row of n entries as V::L-wide vectors: n_full entries in full vectors, then n_tail < L.
template <class V>
struct RowShape {
  int64_t n, n_full, n_tail;
  explicit RowShape(int64_t n_) : n(n_), n_full(n_ - n_ % V::L), n_tail(n_ - n_full) {}
};

// Which part of a row a sweep's step is at: a full vector, or the row's last n_tail entries
// (whose padding lanes read -inf: exp gives 0, max ignores them).
struct FullVec {};
struct TailVec {
  int64_t count;
};

template <class V, class T>
static inline V load_part(const T* p, FullVec) {
  return V::load(p);
}
template <class V, class T>
static inline V load_part(const T* p, TailVec tail) {
  return load_tail<V>(p, tail.count, -std::numeric_limits<typename V::scalar>::infinity());
}

// The plain loader of a sweep: entries [i, i + L) of p (loaders let dkd leave its target out).
struct LoadAll {
  template <class V, class T, class Part>
  V load(const T* p, int64_t i, Part part) const {
    return load_part<V>(p + i, part);
  }
};

// step(i, part) over the row's vectors in order.
template <class V, class Step>
static inline void for_each_vec(const RowShape<V>& r, Step&& step) {
  for (int64_t i = 0; i < r.n_full; i += V::L) step(i, FullVec{});
  if (r.n_tail) step(r.n_full, TailVec{r.n_tail});
}

// As for_each_vec, with flush() after every kBlock entries and after the tail (see the top).
template <class V, class Step, class Flush>
static inline void blocked_sweep(const RowShape<V>& r, Step&& step, Flush&& flush) {
  constexpr int64_t kBlock = 64 * V::L;
  for (int64_t b = 0; b < r.n_full; b += kBlock) {
    const int64_t e = std::min(b + kBlock, r.n_full);
    for (int64_t i = b; i < e; i += V::L) step(i, FullVec{});
    flush();
  }
  if (r.n_tail) {
    step(r.n_full, TailVec{r.n_tail});
    flush();
  }
}

// A row that reports NaN (loss and gradient): no exception can leave a parallel region.
template <class TS>
static inline void fail_row(double* row_loss, int64_t row, TS* g, int64_t n) {
  row_loss[row] = std::numeric_limits<double>::quiet_NaN();
  if (g) fill_row(g, n, std::numeric_limits<float>::quiet_NaN());
}

// The row prologue: whether row `row` is computed. A row whose label is ignore_index gets loss 0
// and a zero gradient, one whose label is outside [0, n) fails (fail_row); without labels every
// row is computed.
template <class TS>
static inline bool row_is_live(const int64_t* labels, int64_t ignore_index, int64_t row, int64_t n, double* row_loss, TS* g) {
  if (!labels) return true;
  const int64_t label = labels[row];
  if (label == ignore_index) {
    row_loss[row] = 0;
    if (g) fill_row(g, n, 0.f);
    return false;
  }
  if (label < 0 || label >= n) {
    fail_row(row_loss, row, g, n);
    return false;
  }
  return true;
}

// The rows [begin, end) of a student-teacher row kernel (kd, divergences, dkd) that are computed
// (row_is_live), each as body(row, s, t, g): the row's student and teacher entries and its
// gradient (null when none is wanted).
template <class TS, class TT, class Args, class Body>
static inline void for_each_live_row(const Args& a, int64_t begin, int64_t end, Body&& body) {
  const int64_t n = a.vocab;
  for (int64_t row = begin; row < end; ++row) {
    const TS* s = static_cast<const TS*>(a.student) + row * n;
    const TT* t = static_cast<const TT*>(a.teacher) + row * n;
    TS* g = a.grad ? static_cast<TS*>(a.grad) + row * n : nullptr;
    if (row_is_live(a.labels, a.ignore_index, row, n, a.row_loss, g)) body(row, s, t, g);
  }
}

// Scratch row i of a row kernel's per-thread scratch: rows of n entries of C, scratch_row_bytes apart.
template <class C>
static inline C* scratch_row(void* scratch, int64_t n, int i) {
  return reinterpret_cast<C*>(static_cast<char*>(scratch) + i * scratch_row_bytes(n, sizeof(C)));
}

// What a kernel sweeping a student and a teacher row (kd, dkd) starts each thread with: the rows'
// vector shape, 1/T in the compute type, and its two scratch rows (2 scratch_row_bytes, owned by
// the calling thread) for the exponentials e_s and e_t.
template <class V>
struct TwoRowStart {
  using C = typename V::scalar;
  RowShape<V> r;
  C inv_t;
  C* exp_s;
  C* exp_t;

  template <class Args>
  TwoRowStart(const Args& a, void* scratch)
      : r(a.vocab), inv_t(C(a.inv_temperature)), exp_s(scratch_row<C>(scratch, a.vocab, 0)),
        exp_t(scratch_row<C>(scratch, a.vocab, 1)) {}
};

// The maxima of one or two rows, read together (NaN kept).
template <class V, class T, class Load = LoadAll>
static inline typename V::scalar row_max(const T* x, const RowShape<V>& r, Load load = {}) {
  V mx = V::set1(-std::numeric_limits<typename V::scalar>::infinity());
  for_each_vec(r, [&](int64_t i, auto part) { mx = V::max(mx, load.template load<V>(x, i, part)); });
  return mx.max();
}
template <class V, class TS, class TT, class Load = LoadAll>
static inline void row_max2(const TS* s, const TT* t, const RowShape<V>& r, typename V::scalar& ms, typename V::scalar& mt,
                            Load load = {}) {
  const V neg_inf = V::set1(-std::numeric_limits<typename V::scalar>::infinity());
  V mx_s = neg_inf, mx_t = neg_inf;
  for_each_vec(r, [&](int64_t i, auto part) {
    mx_s = V::max(mx_s, load.template load<V>(s, i, part));
    mx_t = V::max(mx_t, load.template load<V>(t, i, part));
  });
  ms = mx_s.max();
  mt = mx_t.max();
}

// The totals of an exponential sweep (exp_sweep), in double.
struct ExpSums {
  double s = 0;    // sum e_s
  double t = 0;    // sum e_t (with a teacher)
  double num = 0;  // sum e_t (lt - ls), the KL numerator (KlNum)
  double ce = 0;   // sum exp(s - ms), the temperature-1 softmax's (ce)
};

// Where an exp_sweep puts what it computes, and what it fetches meanwhile.
template <class C, class TS, class TT>
struct ExpRows {
  C* exp_s;                     // e_s = exp((s - ms)/T), [n_full + L]
  C* exp_t = nullptr;           // e_t = exp((t - mt)/T), with a teacher
  const TS* next_s = nullptr;   // prefetched, entry by entry (null: nothing)
  const TT* next_t = nullptr;

  // Both rows' exponentials, fetching the next row of s and t (n entries on) meanwhile, unless
  // there is none (`last`).
  static ExpRows with_next(C* exp_s, C* exp_t, const TS* s, const TT* t, int64_t n, bool last) {
    return {exp_s, exp_t, last ? nullptr : s + n, last ? nullptr : t + n};
  }
};

// The exponential sweep of a row: e_s (and, WithTeacher, e_t) into the scratch rows and their
// sums; KlNum: also sum e_t (lt - ls) with lt, ls the scaled logit differences (an entry
// with e_t == 0, a -inf teacher logit, contributes 0, not 0 * inf); ce: also the temperature-1
// sum exp(s - ms) of the cross-entropy when T != 1. hook(i, part) runs after each step, with the
// step's position: other work for the same vector of another row (kd writes the previous row's
// gradient there, so that its stores overlap this row's arithmetic).
struct NoHook {
  template <class Part>
  void operator()(int64_t, Part) const {}
};
template <class V, bool WithTeacher, bool KlNum, class TS, class TT, class Load = LoadAll, class Hook = NoHook>
static inline ExpSums exp_sweep(const TS* s, const TT* t, const RowShape<V>& r, typename V::scalar ms, typename V::scalar mt,
                                typename V::scalar inv_t, bool ce, const ExpRows<typename V::scalar, TS, TT>& out,
                                Load load = {}, Hook hook = {}) {
  using C = typename V::scalar;
  const V vms = V::set1(ms), vmt = V::set1(mt), vit = V::set1(inv_t), zero = V::set1(C(0));
  V sum_s = zero, sum_t = zero, num = zero, sum_ce = zero;
  ExpSums tot;
  auto step = [&](int64_t i, auto part) {
    if constexpr (std::is_same_v<decltype(part), FullVec>) {
      if (out.next_s) __builtin_prefetch(out.next_s + i, 0, 2);
      if (out.next_t) __builtin_prefetch(out.next_t + i, 0, 2);
    }
    const V ds = load.template load<V>(s, i, part) - vms;
    const V ls = ds * vit;
    const V es = V::exp(ls);
    es.store(out.exp_s + i);
    sum_s = sum_s + es;
    if constexpr (WithTeacher) {
      const V lt = (load.template load<V>(t, i, part) - vmt) * vit;
      const V et = V::exp(lt);
      et.store(out.exp_t + i);
      sum_t = sum_t + et;
      if constexpr (KlNum) num = num + V::zero_where_zero(et, et * (lt - ls));
    }
    if (ce) sum_ce = sum_ce + V::exp(ds);
    hook(i, part);
  };
  auto flush = [&] {
    tot.s += double(sum_s.sum()), tot.t += double(sum_t.sum());
    sum_s = sum_t = zero;
    if constexpr (KlNum) tot.num += double(num.sum()), num = zero;
    if (ce) tot.ce += double(sum_ce.sum()), sum_ce = zero;
  };
  blocked_sweep(r, step, flush);
  return tot;
}

// The cross-entropy of a row at temperature 1: ms + log sum exp(s - ms) - s[label].
template <class C, class TS>
static inline double row_cross_entropy(C ms, double sum_exp, const TS* s, int64_t label) {
  return double(ms) + std::log(sum_exp) - double(to_compute<C>(s[label]));
}

// A row's gradient coefficients with its grad_output folded in (docs/design.md#gradient-scale):
// the soft term's and the cross-entropy's, each times the row's factor.
struct GradCoefs {
  double soft, hard;
};
template <class Args>
static inline GradCoefs grad_coefs(const Args& a, int64_t row) {
  const double rs = row_factor(a.grad_row_scale, row);
  return {a.soft_grad_coef * rs, a.hard_grad_coef * rs};
}

// Where a gradient row goes, vector by vector, each rounded once to TS. With `stream` (the
// gradient outgrows the caches) and g aligned to a vector, the full vectors go out with
// non-temporal stores, which save the read-for-ownership of each line; done() then orders them
// before the caller's later stores (the label's entry).
template <class V, class TS>
struct GradRowOut {
  TS* g;
  bool stream;
  GradRowOut(TS* g_, bool stream_) : g(g_), stream(stream_ && reinterpret_cast<uintptr_t>(g_) % (V::L * sizeof(TS)) == 0) {}
  void put(int64_t i, FullVec, V v) const {
    if (stream) v.stream(g + i);
    else v.store(g + i);
  }
  void put(int64_t i, TailVec tail, V v) const { store_tail(v, g + i, tail.count); }
  void done() const {
    if (stream) V::fence();
  }
};

// The gradient row g = value(i, part) over the row (GradRowOut).
template <class V, class TS, class Value>
static inline void write_grad_row(TS* g, const RowShape<V>& r, bool stream, Value&& value) {
  const GradRowOut<V, TS> out(g, stream);
  for_each_vec(r, [&](int64_t i, auto part) { out.put(i, part, value(i, part)); });
  out.done();
}

// The entry point of a two-input row kernel: every storage-type pair, float64 input computing in
// double (VecFor).
#define FASTKD_ROWS_ENTRY(name, Args, kernel)                                                \
  void name(const Args& a, int64_t begin, int64_t end, void* scratch) {                      \
    with_storage(a.student_dtype, a.teacher_dtype, [&](auto s, auto t) {                     \
      using TS = typename decltype(s)::type;                                                 \
      using TT = typename decltype(t)::type;                                                 \
      kernel<VecFor<TS, TT>, TS, TT>(a, begin, end, scratch);                                \
    });                                                                                      \
  }
