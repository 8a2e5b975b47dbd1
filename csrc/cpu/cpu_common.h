// What every CPU op family shares around its row kernel: the instruction-set choice, the
// gradient buffer (kept for reuse between calls), the row-parallel loop with per-thread scratch,
// valid-row counting and the reduction of per-row losses.
//
// A family's torch wrapper (csrc/cpu/<family>_cpu.cpp) checks its arguments, fills its plain
// argument struct, and calls these; its row kernel (csrc/cpu/<family>_kernel.h) is compiled once
// per instruction set by isa_{avx512,avx2,scalar}.cpp and picked with pick_isa().
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>

#include "dtype.h"
#include "row_args.h"

namespace fastkd {
namespace cpu {

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2 };

// The widest instruction set this CPU has, or the narrower one FASTKD_CPU_ISA asks for.
Isa selected_isa();

template <class Fn>
Fn pick_isa(Fn avx512, Fn avx2, Fn scalar) {
  switch (selected_isa()) {
    case Isa::Avx512: return avx512;
    case Isa::Avx2: return avx2;
    default: return scalar;
  }
}

// The storage type of a float tensor; any other dtype is an error naming op and argument.
DType to_dtype(const at::Tensor& x, const char* op, const char* name);

// A gradient of at least this many bytes is "large": it will have left the caches by the time
// the backward reads it (so it is written with non-temporal stores), and a fresh one costs
// noticeable page faults (so its buffer is kept for reuse).
constexpr size_t kLargeGradBytes = size_t(8) << 20;

// A tensor shaped and typed like `like` for the gradient, reusing the last large buffer when
// nobody holds it any more (fastkd.empty_cache() frees it).
at::Tensor new_grad_buffer(const at::Tensor& like);

// A fused op's grad_scale: the backward's grad_output, multiplied into the gradient before its
// one rounding to the student's dtype (so that a 16-bit gradient is rounded exactly once).
// Absent (1), one element (every row), or n_rows elements (per row: reduction="none").
struct GradScale {
  double scalar = 1;
  at::Tensor rows;  // double [n_rows], or undefined
  const double* row_ptr() const { return rows.defined() ? rows.const_data_ptr<double>() : nullptr; }
  bool is_one() const { return !rows.defined() && scalar == 1; }
};
GradScale read_grad_scale(const std::optional<at::Tensor>& grad_scale, int64_t n_rows, const char* op);

// The gradient buffer of a call: `into` when given (a rescale op's target: the forward's
// gradient, checked to be shaped and typed like the student), else new_grad_buffer(student).
at::Tensor grad_buffer(const at::Tensor& student, const at::Tensor* into, const char* op);

// Checks labels ([n_rows] contiguous int64 CPU, or absent) and counts the rows whose label is
// not ignore_index (all rows without labels). *label_ptr is set to the data or null.
int64_t count_valid_rows(const std::optional<at::Tensor>& labels, int64_t n_rows, int64_t ignore_index, const char* op,
                         const int64_t** label_ptr);

void check_reduction(std::string_view reduction, const char* op);

// The factor the gradient carries for a reduction: 1 / valid rows for "batchmean" (0 when there
// are none: every row is then ignored and zero anyway), else 1.
double reduction_scale(std::string_view reduction, int64_t n_valid);

// The op's loss output from per-row losses (double [n_rows]): [n_rows] for "none", else their
// sum in row order (deterministic whatever the thread count), divided by n_valid for
// "batchmean"; float64 when the student is float64, else float32.
at::Tensor reduce_rows(const at::Tensor& row_loss, std::string_view reduction, int64_t n_valid, at::ScalarType student_dtype);

// Runs rows(begin, end, scratch) over [0, n_rows) on the intra-op thread pool; each task gets
// its own scratch of scratch_bytes. A task takes at least enough rows for ~16k entries.
template <class Rows>
void parallel_rows(int64_t n_rows, int64_t row_len, size_t scratch_bytes, const Rows& rows) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(row_len, 1));
  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
    std::unique_ptr<char[]> scratch(scratch_bytes ? new char[scratch_bytes] : nullptr);
    rows(begin, end, static_cast<void*>(scratch.get()));
  });
}

// Runs a family's row kernel (picked with pick_isa) over every row with parallel_rows.
template <class Args>
void run_rows(void (*rows)(const Args&, int64_t, int64_t, void*), const Args& a, int64_t n_rows, int64_t row_len,
              size_t scratch_bytes) {
  parallel_rows(n_rows, row_len, scratch_bytes, [&](int64_t begin, int64_t end, void* scratch) { rows(a, begin, end, scratch); });
}

// One call of a fused softmax row op (kd, dkd, sparse kd), set up the same way for every family:
// its rows, labels and valid rows, grad_scale and the reduction's scale, and the per-row loss
// and gradient buffers.
struct RowCall {
  int64_t n_rows = 0, vocab = 0, n_valid = 0;
  const int64_t* labels = nullptr;
  GradScale extra;
  double scale = 1;  // the reduction's scale times a one-element grad_scale
  at::Tensor row_loss, grad;
  bool compute_grad = false;

  // The argument fields every family's struct has (KdArgs, DkdArgs, SparseKdArgs).
  void fill(RowArgs& a, const at::Tensor& student, int64_t ignore_index, const char* op) const {
    a.student = student.data_ptr();
    a.labels = labels;
    a.grad = compute_grad ? grad.data_ptr() : nullptr;
    a.row_loss = row_loss.data_ptr<double>();
    a.student_dtype = to_dtype(student, op, "student");
    a.n_rows = n_rows;
    a.vocab = vocab;
    a.ignore_index = ignore_index;
    a.grad_row_scale = extra.row_ptr();
    a.stream_grad = compute_grad && grad.nbytes() >= kLargeGradBytes;
  }

  // The op's (loss, grad); grad is empty for a rescale op (it wrote into its target).
  std::tuple<at::Tensor, at::Tensor> finish(std::string_view reduction, const at::Tensor& student, const at::Tensor* into) const;
};

// student: [N, V] (checked by the family); into: a rescale op's target, else null.
RowCall begin_row_call(const at::Tensor& student, const std::optional<at::Tensor>& labels, int64_t ignore_index,
                       std::string_view reduction, bool compute_grad, const std::optional<at::Tensor>& grad_scale,
                       at::Tensor* into, const char* op);

// The temperature-KD coefficients of KdArgs and SparseKdArgs (row_args.h): the soft term weighs
// 1 - hard_weight, times T^2 (loss) and T (gradient) with t2_scale, else 1 and 1/T.
inline void set_kd_coefs(KdCoefs& a, double temperature, double hard_weight, bool t2_scale, double scale) {
  a.inv_temperature = 1.0 / temperature;
  a.soft_loss_coef = (1 - hard_weight) * (t2_scale ? temperature * temperature : 1.0);
  a.soft_grad_coef = (1 - hard_weight) * (t2_scale ? temperature : 1.0 / temperature) * scale;
  a.hard_weight = hard_weight;
  a.hard_grad_coef = hard_weight * scale;
}

// The body of a rescale op (<op>_rescale_, csrc/ops.cpp): impl(&grad) recomputes the forward's
// gradient into `grad` with grad_scale folded in; nothing to do when grad_scale is 1.
template <class Impl>
void rescale_into(at::Tensor& grad, const at::Tensor& student, const at::Tensor& grad_scale, const char* op, Impl&& impl) {
  if (read_grad_scale(grad_scale, student.size(0), op).is_one()) return;
  impl(&grad);
}

// Registers a fused op's CPU kernel and its rescale op's, named <name>_rescale_ (csrc/ops.cpp).
template <class Forward, class Rescale>
void impl_with_rescale(torch::Library& m, const char* name, Forward forward, Rescale rescale) {
  m.impl(name, forward);
  m.impl((std::string(name) + "_rescale_").c_str(), rescale);
}

}  // namespace cpu
}  // namespace fastkd

// Declares an entry point compiled once per instruction set (isa_*.cpp), e.g.
//   FASTKD_PER_ISA(void kd_rows(const KdArgs&, int64_t, int64_t, void*))
#define FASTKD_PER_ISA(decl) \
  namespace fastkd {         \
  namespace avx512 {         \
  decl;                      \
  }                          \
  namespace avx2 {           \
  decl;                      \
  }                          \
  namespace scalar {         \
  decl;                      \
  }                          \
  }
