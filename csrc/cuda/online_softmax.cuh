// The online softmax of the logit kernels (kd_cuda.cu, dkd_cuda.cu, sparse_kd_cuda.cu): one thread
// block per row, the row read in chunks, each thread keeping online log-sum-exp statistics over
// its strided entries that the block then merges (docs/design.md#online-softmax). Here once: the
// row's chunks and loads, the online (maximum, sum) of one distribution and the two-distribution
// KL state with their rescaling and merge rules, the row prologue for ignored and broken rows, the
// gradient pass's sweep, the hard-label cross-entropy term, and the host's choice of load width
// and block size.
//
// Everything is in base 2: a distribution over logits z at temperature T is kept as its maximum m
// of the raw logits and sum 2^((z - r) * x_scale), x_scale = log2(e)/T, where the reference
// r = ref_of(m) is m, or 0 while m is still -inf (so -inf - -inf never occurs). Moving a sum to
// a larger reference r' multiplies it by 2^((m - r') * x_scale); 2^(-inf) = 0 takes care of a
// side that has seen nothing finite. NaN inputs propagate through the sums, whatever fmax does
// with NaN.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <iterator>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>

#include "cuda_common.cuh"
#include "gpu_kernel_info.h"

namespace fastkd::online_softmax {

using namespace cuda_common;

// Block sizes the row kernels' launchers choose from (the smallest whose chunk covers the row),
// recorded in the library for the static occupancy report (gpu_kernel_info.h). The largest is the
// kernels' __launch_bounds__; all are multiples of 32 (block_allreduce needs whole warps).
#define FASTKD_ROW_THREADS 64, 128, 256, 512
constexpr int kRowThreads[] = {FASTKD_ROW_THREADS};
constexpr int kRowMaxThreads = kRowThreads[std::size(kRowThreads) - 1];
static_assert(valid_block_table(kRowThreads), "kRowThreads must be increasing multiples of 32");
constexpr int kRowMaxWarps = kRowMaxThreads / 32;

// Entries of each input a thread holds per chunk: kRowElems<VEC> / VEC loads of VEC elements.
// Scalar loads take fewer, to stay within the 128 registers that 512 threads allow.
template <int VEC>
constexpr int kRowElems = VEC == 1 ? 4 : 2 * VEC;

// No entry of the row left out (load_chunk's default), or one (DKD's target).
struct NoSkip {
  __device__ __forceinline__ bool operator()(int64_t) const { return false; }
};
struct SkipIndex {
  int64_t index;
  __device__ __forceinline__ bool operator()(int64_t i) const { return i == index; }
};

// Loads this thread's N entries of the chunk at `base`; past the row end, and where skip(i): -inf.
// With VEC > 1 the host guarantees V % VEC == 0 and aligned rows, so a vector is all in or all out.
template <int VEC, int N, typename T, typename acc_t, typename Skip = NoSkip>
__device__ __forceinline__ void load_chunk(const T* __restrict__ row, int64_t vocab, int64_t base, acc_t (&out)[N],
                                           Skip skip = {}) {
#pragma unroll
  for (int u = 0; u < N / VEC; ++u) {
    const int64_t i = slot_index<VEC>(base, u);
    if (i < vocab) {
      const Vec<T, VEC> v = *reinterpret_cast<const Vec<T, VEC>*>(row + i);
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[u * VEC + k] = skip(i + k) ? neg_inf<acc_t>() : load_as<acc_t>(&v.v[k]);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[u * VEC + k] = neg_inf<acc_t>();
    }
  }
}

template <int N, typename acc_t>
__device__ __forceinline__ acc_t chunk_max(const acc_t (&v)[N]) {
  acc_t m = v[0];
#pragma unroll
  for (int k = 1; k < N; ++k) m = max_(m, v[k]);
  return m;
}

// Two sums at maxima ma and mb merged at r, the reference of the larger maximum.
template <typename acc_t>
__device__ __forceinline__ acc_t merge_sums(acc_t sa, acc_t ma, acc_t sb, acc_t mb, acc_t r, acc_t scale) {
  return sa * exp2_((ma - r) * scale) + sb * exp2_((mb - r) * scale);
}

// The online log-sum-exp of one distribution.
template <typename acc_t>
struct Lse {
  acc_t m;    // maximum of the raw logits (-inf: nothing finite yet)
  acc_t sum;  // sum 2^((z - ref_of(m)) * scale)

  __device__ __forceinline__ static Lse empty() { return {neg_inf<acc_t>(), acc_t(0)}; }

  template <int N>
  __device__ __forceinline__ void add_chunk(const acc_t (&v)[N], acc_t scale) {
    const acc_t nm = max_(m, chunk_max(v));
    const acc_t r = ref_of(nm);
    sum *= exp2_((m - r) * scale);
#pragma unroll
    for (int k = 0; k < N; ++k) sum += exp2_((v[k] - r) * scale);
    m = nm;
  }

  __device__ __forceinline__ void merge(const Lse& b, acc_t scale) {
    const acc_t nm = max_(m, b.m);
    sum = merge_sums(sum, m, b.sum, b.m, ref_of(nm), scale);
    m = nm;
  }
};

// The student's log-sum-exp at the soft term's scale and, for the hard-label CE when T != 1
// (sep_ce), sum_1 = sum e^(s - r) at the same reference.
template <typename acc_t>
struct StudentLse {
  Lse<acc_t> lse;
  acc_t sum_1;

  __device__ __forceinline__ static StudentLse empty() { return {Lse<acc_t>::empty(), acc_t(0)}; }

  // Both sums in one pass over the chunk, so that its entries are not held for a second one.
  template <int N>
  __device__ __forceinline__ void add_chunk(const acc_t (&v)[N], acc_t xs, bool sep_ce) {
    const acc_t log2e = Consts<acc_t>::kLog2e;
    const acc_t nm = max_(lse.m, chunk_max(v));
    const acc_t r = ref_of(nm);
    lse.sum *= exp2_((lse.m - r) * xs);
    if (sep_ce) sum_1 *= exp2_((lse.m - r) * log2e);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      lse.sum += exp2_((v[k] - r) * xs);
      if (sep_ce) sum_1 += exp2_((v[k] - r) * log2e);
    }
    lse.m = nm;
  }

  __device__ __forceinline__ void merge(const StudentLse& b, acc_t xs, bool sep_ce) {
    if (sep_ce) sum_1 = merge_sums(sum_1, lse.m, b.sum_1, b.lse.m, ref_of(max_(lse.m, b.lse.m)), Consts<acc_t>::kLog2e);
    lse.merge(b.lse, xs);
  }
};

// Online statistics of two distributions over the same entries, student s and teacher t, for
// KL(p || q) (docs/design.md#kd): with x = (s - r_s) x_scale, y = (t - r_t) x_scale,
//
//   sum_s = sum 2^x,   sum_t = sum 2^y,   a = sum_{2^y != 0} 2^y (y - x)
//
// and KL = ln2 * (a / sum_t + log2 sum_s - log2 sum_t) (kl_of). a is relative to both references,
// so a constant offset between teacher and student logits cancels inside each term instead of
// between two large numbers at the end; terms with 2^y == 0 (teacher -inf, masked vocabulary) are
// 0, not 0 * inf. When the references grow, the sums are rescaled and a also gains sum_t times the
// shift of both references.
template <typename acc_t>
struct KlState {
  acc_t m_s, m_t;      // maxima of the raw student / teacher logits (-inf: nothing finite yet)
  acc_t sum_s, sum_t;  // sum 2^x, sum 2^y
  acc_t a;             // sum 2^y (y - x)

  __device__ __forceinline__ static KlState empty() {
    return {neg_inf<acc_t>(), neg_inf<acc_t>(), acc_t(0), acc_t(0), acc_t(0)};
  }

  // One chunk of both rows (-inf past the row end): one rescale, then the entries.
  template <int N>
  __device__ __forceinline__ void add_chunk(const acc_t (&sv)[N], const acc_t (&tv)[N], acc_t xs) {
    acc_t none = acc_t(0);
    add_chunk(sv, tv, xs, false, none);
  }

  // The same and, with ce, sum_1 = sum e^(s - r_s) (the CE's sum when T != 1) in the same pass, so
  // that the chunk's entries are not held for a second one.
  template <int N>
  __device__ __forceinline__ void add_chunk(const acc_t (&sv)[N], const acc_t (&tv)[N], acc_t xs, bool ce, acc_t& sum_1) {
    const acc_t log2e = Consts<acc_t>::kLog2e;
    const acc_t nm_s = max_(m_s, chunk_max(sv));
    const acc_t nm_t = max_(m_t, chunk_max(tv));
    const acc_t r_s = ref_of(nm_s);
    const acc_t r_t = ref_of(nm_t);
    const acc_t f_t = exp2_((m_t - r_t) * xs);
    a = f_t * (a + sum_t * (((ref_of(m_t) - r_t) - (ref_of(m_s) - r_s)) * xs));
    sum_t *= f_t;
    sum_s *= exp2_((m_s - r_s) * xs);
    if (ce) sum_1 *= exp2_((m_s - r_s) * log2e);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const acc_t x = (sv[k] - r_s) * xs;
      const acc_t y = (tv[k] - r_t) * xs;
      const acc_t e_t = exp2_(y);
      sum_s += exp2_(x);
      sum_t += e_t;
      a += e_t == acc_t(0) ? acc_t(0) : e_t * (y - x);
      if (ce) sum_1 += exp2_((sv[k] - r_s) * log2e);
    }
    m_s = nm_s;
    m_t = nm_t;
  }

  // this <- this merged with b, each side rescaled from its own references to the merged ones.
  __device__ __forceinline__ void merge(const KlState& b, acc_t xs) {
    const acc_t nm_s = max_(m_s, b.m_s);
    const acc_t nm_t = max_(m_t, b.m_t);
    const acc_t r_s = ref_of(nm_s);
    const acc_t r_t = ref_of(nm_t);
    const acc_t fa_s = exp2_((m_s - r_s) * xs);
    const acc_t fb_s = exp2_((b.m_s - r_s) * xs);
    const acc_t fa_t = exp2_((m_t - r_t) * xs);
    const acc_t fb_t = exp2_((b.m_t - r_t) * xs);
    const acc_t da = ((ref_of(m_t) - r_t) - (ref_of(m_s) - r_s)) * xs;
    const acc_t db = ((ref_of(b.m_t) - r_t) - (ref_of(b.m_s) - r_s)) * xs;
    a = fa_t * (a + sum_t * da) + fb_t * (b.a + b.sum_t * db);
    sum_s = sum_s * fa_s + b.sum_s * fb_s;
    sum_t = sum_t * fa_t + b.sum_t * fb_t;
    m_s = nm_s;
    m_t = nm_t;
  }
};

// KL(p || q) of a merged KlState, given log2 of its two sums.
template <typename acc_t>
__device__ __forceinline__ acc_t kl_of(const KlState<acc_t>& st, acc_t log2_ss, acc_t log2_st) {
  return Consts<acc_t>::kLn2 * (st.a / st.sum_t + log2_ss - log2_st);
}

// -- the row ------------------------------------------------------------------------------------

// A row that is not computed: label == ignore_index, or a label outside [0, V) (the broken row).
__device__ __forceinline__ bool label_skips_row(int64_t label, int64_t vocab, int64_t ignore_index) {
  return label == ignore_index || label < 0 || label >= vocab;
}

// The result of a row that reads nothing: loss 0 and gradient 0 (ignored), or NaN for both (bad).
template <int VEC, typename S, typename acc_t>
__device__ void write_skipped_row(bool bad, acc_t* __restrict__ row_loss, int64_t row, S* __restrict__ g_row, int64_t vocab) {
  if (threadIdx.x == 0) row_loss[row] = bad ? quiet_nan<acc_t>() : acc_t(0);
  if (g_row != nullptr) fill_row<VEC>(g_row, vocab, store_as<S>(bad ? quiet_nan<acc_t>() : acc_t(0)));
}

// A labelled row kernel's row: its index (blockIdx.x) and length, its label (-1 without labels)
// and where it starts in the student, teacher and gradient (g: null when none is written).
template <typename S, typename T>
struct LabelledRow {
  int64_t row, vocab, label;
  const S* s;
  const T* t;
  S* g;
};

// The start of a labelled row kernel's block, whose parameters p give vocab, ignore_index and
// scale.gs: r filled in, and false when the block has nothing more to do, either the rescale op's
// row whose grad_scale is 1 (the forward's gradient stands: nothing is read) or a row that
// label_skips_row (its result written here). Uniform per block: the row and its label are.
template <int VEC, typename S, typename T, typename acc_t, typename Params>
__device__ __forceinline__ bool start_row(const S* student, const T* teacher, S* grad, const int64_t* __restrict__ labels,
                                          acc_t* __restrict__ row_loss, const Params& p, LabelledRow<S, T>& r) {
  const int64_t row = blockIdx.x;
  const int64_t vocab = p.vocab;
  r = {row, vocab, -1, student + row * vocab, teacher + row * vocab, grad == nullptr ? nullptr : grad + row * vocab};
  if (p.scale.gs.skip(row)) return false;
  if (labels == nullptr) return true;
  r.label = labels[row];
  if (label_skips_row(r.label, vocab, p.ignore_index)) {
    write_skipped_row<VEC>(r.label != p.ignore_index, row_loss, row, r.g, vocab);
    return false;
  }
  return true;
}

// The chunks of a row: kRowElems<VEC> entries per thread each.
template <int VEC>
struct Chunks {
  int64_t size, count;
  __device__ __forceinline__ explicit Chunks(int64_t vocab)
      : size(static_cast<int64_t>(blockDim.x) * kRowElems<VEC>), count((vocab + size - 1) / size) {}
};

// The gradient pass of a row kernel (docs/design.md#online-softmax): the row's chunks last first
// (the one read last is the most likely to be still in L2). Per chunk, load(base) reads this
// thread's entries of the chunk at `base` into the caller's arrays; grad(e, j) is then the
// gradient at the thread's entry e (0 <= e < kRowElems<VEC>), index j of the row, rounded once
// to S and stored VEC entries at a time.
template <int VEC, typename S, typename Load, typename Grad>
__device__ __forceinline__ void write_grad_row(S* __restrict__ g_row, int64_t vocab, const Chunks<VEC>& chunks, Load&& load,
                                               Grad&& grad) {
  for (int64_t c = chunks.count - 1; c >= 0; --c) {
    load(c * chunks.size);
#pragma unroll
    for (int u = 0; u < kRowElems<VEC> / VEC; ++u) {
      const int64_t i = slot_index<VEC>(c * chunks.size, u);
      if (i >= vocab) continue;
      Vec<S, VEC> out;
#pragma unroll
      for (int k = 0; k < VEC; ++k) out.v[k] = store_as<S>(grad(u * VEC + k, i + k));
      *reinterpret_cast<Vec<S, VEC>*>(g_row + i) = out;
    }
  }
}

// The factor of a row's gradient: the reduction scale (1 / valid rows for batchmean, on the device
// when only the labels tell it) times grad_scale.
template <typename acc_t>
struct RowScale {
  const acc_t* device;  // the reduction scale on the device, or null
  acc_t host;           // the reduction scale when `device` is null
  GradScale<acc_t> gs;  // grad_scale (cuda_common.cuh)
  __device__ __forceinline__ acc_t of(int64_t row) const {
    return (device != nullptr ? static_cast<acc_t>(*device) : host) * gs.of(row);
  }
};

// The hard-label cross-entropy beside the soft term (T = 1 whatever the soft term's T):
// CE = logsumexp(s) - s[label], its gradient softmax(s) - onehot(label). sum_1 = sum e^(s - r_s),
// which is the soft term's sum_s when T = 1 (same_t).
template <typename acc_t>
__device__ __forceinline__ acc_t ce_loss(acc_t sum_1, acc_t r_s, acc_t s_label) {
  return Consts<acc_t>::kLn2 * log2_(sum_1) + (r_s - s_label);
}

// k_hard * dCE/ds at an entry of logit s (q: the soft term's student softmax there, which is
// softmax(s) when same_t; inv_1 = 1 / sum_1).
template <typename acc_t>
__device__ __forceinline__ acc_t ce_grad(acc_t k_hard, acc_t s, acc_t q, bool is_label, bool same_t, acc_t r_s, acc_t inv_1) {
  const acc_t sm = same_t ? q : exp2_((s - r_s) * Consts<acc_t>::kLog2e) * inv_1;
  return k_hard * (sm - (is_label ? acc_t(1) : acc_t(0)));
}

// The KD options as the kd and sparse kernels read them (docs/design.md#kd).
template <typename acc_t>
struct KdCoefs {
  int64_t vocab;
  int64_t ignore_index;
  acc_t x_scale;         // log2(e) / T
  acc_t soft_loss_coef;  // (1 - a) * (T or 1); the loss's T^2 is this times soft_loss_t
  acc_t soft_loss_t;     // T or 1: two factors, since T^2 alone overflows float from T ~ 1.8e19
  acc_t hard_weight;     // a
  acc_t soft_grad_coef;  // (1 - a) * (T or 1/T) * the divergence's factor, before the row scale
  RowScale<acc_t> scale;
  bool has_ce;  // labels given and a > 0
  bool same_t;  // T == 1: the CE softmax is the student softmax

  // The row's loss from its soft term; the CE's s[label] is read only with the CE.
  template <typename S>
  __device__ __forceinline__ acc_t row_loss(acc_t soft, acc_t sum_1, acc_t r_s, const S* s_row, int64_t label) const {
    acc_t loss = soft_loss_coef * (soft_loss_t * soft);
    if (has_ce) loss += hard_weight * ce_loss(sum_1, r_s, load_as<acc_t>(s_row + label));
    return loss;
  }

  // The soft and hard terms' gradient factors of a row, the row scale included.
  struct GradCoefs {
    acc_t soft, hard;
  };
  __device__ __forceinline__ GradCoefs grad_coefs(int64_t row) const {
    const acc_t s = scale.of(row);
    return {soft_grad_coef * s, hard_weight * s};
  }
};

// -- host side ----------------------------------------------------------------------------------

template <typename acc_t>
KdCoefs<acc_t> kd_coefs(int64_t vocab, int64_t ignore_index, double temperature, double hard_weight, bool t2_scale,
                        double grad_factor, bool has_labels, const RowScale<acc_t>& scale) {
  KdCoefs<acc_t> c;
  c.vocab = vocab;
  c.ignore_index = ignore_index;
  c.x_scale = static_cast<acc_t>(1.4426950408889634 / temperature);
  c.soft_loss_coef = static_cast<acc_t>((1.0 - hard_weight) * (t2_scale ? temperature : 1.0));
  c.soft_loss_t = static_cast<acc_t>(t2_scale ? temperature : 1.0);
  c.hard_weight = static_cast<acc_t>(hard_weight);
  c.soft_grad_coef = static_cast<acc_t>((1.0 - hard_weight) * (t2_scale ? temperature : 1.0 / temperature) * grad_factor);
  c.scale = scale;
  c.has_ce = has_labels && hard_weight > 0;
  c.same_t = temperature == 1.0;
  return c;
}

inline void check_row_reduction(std::string_view reduction, const char* op) {
  TORCH_CHECK(reduction == "none" || reduction == "sum" || reduction == "batchmean", op,
              "reduction must be 'none', 'sum' or 'batchmean', got '", std::string(reduction), "'");
}

// labels, checked (int64 [n_rows], contiguous, on the student's device), or null when absent.
inline const at::Tensor* checked_labels(const std::optional<at::Tensor>& labels, int64_t n_rows, const at::Device& device,
                                        const char* op) {
  if (!labels.has_value() || !labels->defined()) return nullptr;
  const at::Tensor& l = *labels;
  TORCH_CHECK(l.scalar_type() == at::kLong, op, "labels must be int64, got ", l.scalar_type());
  TORCH_CHECK(l.dim() == 1 && l.size(0) == n_rows, op, "labels must have shape [", n_rows, "], got ", l.sizes());
  TORCH_CHECK(l.device() == device, op, "labels are on ", l.device(), ", student on ", device);
  TORCH_CHECK(l.is_contiguous(), op, "labels must be contiguous");
  return &l;
}

// What a row kernel's launcher prepares around it, and the op's loss after it: the row losses
// (in the accumulation type), the gradient buffer, grad_scale and the reduction scale.
struct RowOutputs {
  at::Tensor row_loss, grad, grad_scale;
  // batchmean divides by the rows whose label is not ignore_index, known only on the device (no
  // host synchronisation). With none of them every row loss and gradient row is 0, so any finite
  // scale will do: clamped to 1. Without labels it is 1 / N, on the host.
  at::Tensor scale_t;
  double host_scale = 1.0;
  int64_t n_rows = 0;
  std::string_view reduction;

  RowOutputs(const at::Tensor& student, at::ScalarType acc_dtype, const at::Tensor* labels, int64_t ignore_index,
             std::string_view reduction_, bool compute_grad, const std::optional<at::Tensor>& grad_scale_opt,
             at::Tensor* into, const char* op)
      : n_rows(student.size(0)), reduction(reduction_) {
    row_loss = at::empty({n_rows}, student.options().dtype(acc_dtype));
    grad = compute_grad ? grad_buffer(student, into, op) : at::empty({0}, student.options());
    grad_scale = grad_scale_tensor(grad_scale_opt, n_rows, student.device(), acc_dtype, op);
    const bool batchmean = reduction == "batchmean";
    if (batchmean && labels != nullptr) scale_t = labels->ne(ignore_index).sum().clamp_min(1).to(acc_dtype).reciprocal();
    if (batchmean && labels == nullptr) host_scale = 1.0 / static_cast<double>(n_rows);
  }

  // The factor of each row's gradient; skip_one for the rescale op (cuda_common.cuh GradScale).
  template <typename acc_t>
  RowScale<acc_t> row_scale(bool skip_one) const {
    return {scale_t.defined() ? scale_t.const_data_ptr<acc_t>() : nullptr, static_cast<acc_t>(host_scale),
            grad_scale_of<acc_t>(grad_scale, skip_one)};
  }

  at::Tensor loss(at::ScalarType loss_dtype) const {
    at::Tensor loss;
    if (reduction == "none") {
      loss = row_loss;
    } else if (reduction == "sum") {
      loss = row_loss.sum();
    } else if (scale_t.defined()) {
      loss = row_loss.sum() * scale_t;
    } else {
      loss = row_loss.sum() / static_cast<double>(n_rows);
    }
    return loss.to(loss_dtype);
  }
};

// Launches launch(std::integral_constant<int, VEC>, grid, threads, stream), one block per row:
// VEC = MAX_VEC when V % MAX_VEC == 0 and every array's base (with its element size) is aligned to
// MAX_VEC elements, so that every row starts on a vector boundary; else VEC = 1. The block is the
// smallest of kRowThreads whose chunk covers the row.
struct Base {
  const void* ptr;  // null: the array is absent (no gradient)
  size_t elem;
};

template <int MAX_VEC, typename Launch>
void launch_rows(int64_t n_rows, int64_t vocab, std::initializer_list<Base> bases, Launch&& launch) {
  bool vec = vocab % MAX_VEC == 0;
  for (const Base& b : bases) vec = vec && (b.ptr == nullptr || aligned(b.ptr, MAX_VEC * b.elem));
  const int block = block_for_row(kRowThreads, vocab, vec ? kRowElems<MAX_VEC> : kRowElems<1>);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned int>(n_rows));
  if (vec) {
    launch(std::integral_constant<int, MAX_VEC>{}, grid, block, stream);
  } else {
    launch(std::integral_constant<int, 1>{}, grid, block, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fastkd::online_softmax
