// CPU implementation of fastkd::hint_forward and fastkd::attention_transfer_forward: argument
// checks, the coefficients of one call, and the reduction; the instruction-set choice, gradient
// buffer and parallel loop are the shared driver's (cpu_common.h), the kernels feature_kernel.h.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "cpu/cpu_common.h"
#include "feature_args.h"

FASTKD_PER_ISA(void hint_tasks(const HintArgs& a, int64_t begin, int64_t end))
FASTKD_PER_ISA(void attention_rows(const AttentionArgs& a, int64_t begin, int64_t end, void* scratch))

namespace fastkd {
namespace {

// Elementwise hint rows are split into tasks of this many entries, so that a batch of a few
// large samples still keeps every thread busy.
constexpr int64_t kHintChunk = 16384;

void check_feature_reduction(c10::string_view reduction, const char* op) {
  TORCH_CHECK(reduction == "mean" || reduction == "sum" || reduction == "none", "fastkd::", op,
              ": reduction must be mean, sum or none, got \"", std::string(reduction), "\"");
}

// The op's loss from per-row raw losses (double [n_rows]): "none" gives raw * row_scale per row,
// "sum" the sum of raw, "mean" the sum of raw * row_scale / n_rows; summed in row order in
// double. float64 for a float64 student, else float32.
at::Tensor reduce_feature_rows(const at::Tensor& raw, c10::string_view reduction, double row_scale,
                               at::ScalarType student_dtype) {
  const at::ScalarType loss_dtype = student_dtype == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t n = raw.numel();
  const double* r = raw.const_data_ptr<double>();
  if (reduction == "none") {
    at::Tensor rows = at::empty({n}, raw.options());
    double* out = rows.mutable_data_ptr<double>();
    for (int64_t i = 0; i < n; ++i) out[i] = r[i] * row_scale;
    return rows.to(loss_dtype);
  }
  double total = 0;
  for (int64_t i = 0; i < n; ++i) total += r[i];
  if (reduction == "mean") total *= row_scale / double(n);
  at::Tensor loss = at::empty({}, raw.options());
  *loss.mutable_data_ptr<double>() = total;
  return loss.to(loss_dtype);
}

// The fields both ops fill alike (FeatureArgs): the inputs, and the gradient buffer (`into` for
// a rescale op), returned, with its coefficient: the raw row loss times row_scale is the row loss.
// `extra` (the call's grad_scale) must outlive the kernels: they read its per-row factors.
at::Tensor fill_feature_args(FeatureArgs& a, const at::Tensor& student, const at::Tensor& teacher, c10::string_view reduction,
                             double row_scale, bool compute_grad, const cpu::GradScale& extra, at::Tensor* into, const char* op) {
  a.student = student.data_ptr();
  a.teacher = teacher.data_ptr();
  a.student_dtype = cpu::to_dtype(student, op, "student");
  a.teacher_dtype = cpu::to_dtype(teacher, op, "teacher");
  a.n_rows = student.size(0);
  a.grad_coef = (reduction == "none" ? row_scale : reduction == "sum" ? 1.0 : row_scale / double(a.n_rows)) * extra.scalar;
  a.grad_row_scale = extra.row_ptr();
  at::Tensor grad = compute_grad ? cpu::grad_buffer(student, into, op) : at::empty({0}, student.options());
  a.grad = compute_grad ? grad.data_ptr() : nullptr;
  a.stream_grad = compute_grad && grad.nbytes() >= cpu::kLargeGradBytes;
  return grad;
}

HintKind parse_hint_kind(c10::string_view kind) {
  if (kind == "mse") return HintKind::Mse;
  if (kind == "l1") return HintKind::L1;
  if (kind == "smooth_l1") return HintKind::SmoothL1;
  if (kind == "cosine") return HintKind::Cosine;
  if (kind == "normalized_mse") return HintKind::NormalizedMse;
  TORCH_CHECK(false, "fastkd::hint_forward: kind must be mse, l1, smooth_l1, cosine or normalized_mse, got \"",
              std::string(kind), "\"");
}

// The forward, or (into given) the rescale op's recomputation into the forward's gradient.
std::tuple<at::Tensor, at::Tensor> hint_impl(const at::Tensor& student, const at::Tensor& teacher, c10::string_view kind_name,
                                             c10::string_view reduction, bool compute_grad,
                                             const std::optional<at::Tensor>& grad_scale, at::Tensor* into) {
  constexpr const char* kOp = "hint_forward";
  const HintKind kind = parse_hint_kind(kind_name);
  check_feature_reduction(reduction, kOp);
  TORCH_CHECK(student.dim() == 2 && student.is_contiguous(), "fastkd::hint_forward: student must be contiguous [B, D]");
  TORCH_CHECK(teacher.sizes() == student.sizes() && teacher.is_contiguous(),
              "fastkd::hint_forward: teacher must be contiguous and shaped like student ", student.sizes());
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu(), "fastkd::hint_forward (cpu): tensors must be on the CPU");
  const int64_t n_rows = student.size(0), dim = student.size(1);
  TORCH_CHECK(n_rows > 0 && dim > 0, "fastkd::hint_forward: student must have at least one row and one entry, got shape ",
              student.sizes());

  HintArgs a;
  // Raw row loss -> row loss: a mean over the row's entries, except for cosine (1 - cos itself).
  const double row_scale = kind == HintKind::Cosine ? 1.0 : 1.0 / double(dim);
  const cpu::GradScale extra = cpu::read_grad_scale(grad_scale, n_rows, kOp);
  const at::Tensor grad = fill_feature_args(a, student, teacher, reduction, row_scale, compute_grad, extra, into, kOp);
  a.kind = kind;
  a.dim = dim;
  const bool elementwise = hint_kind_is_elementwise(kind);
  a.chunk = elementwise ? kHintChunk : dim;
  a.n_chunks = elementwise ? (dim + kHintChunk - 1) / kHintChunk : 1;
  at::Tensor task_loss = at::empty({n_rows * a.n_chunks}, student.options().dtype(at::kDouble));
  a.task_loss = task_loss.data_ptr<double>();

  const auto tasks = cpu::pick_isa(avx512::hint_tasks, avx2::hint_tasks, scalar::hint_tasks);
  const int64_t task_len = elementwise ? std::min(dim, kHintChunk) : dim;
  cpu::parallel_rows(n_rows * a.n_chunks, task_len, 0, [&](int64_t begin, int64_t end, void*) { tasks(a, begin, end); });

  // Each row's raw loss: its tasks' parts, in order (deterministic whatever the thread count).
  at::Tensor raw = task_loss;
  if (a.n_chunks > 1) {
    raw = at::empty({n_rows}, task_loss.options());
    const double* parts = task_loss.const_data_ptr<double>();
    double* rows = raw.mutable_data_ptr<double>();
    for (int64_t r = 0; r < n_rows; ++r) {
      double total = 0;
      for (int64_t c = 0; c < a.n_chunks; ++c) total += parts[r * a.n_chunks + c];
      rows[r] = total;
    }
  }
  return {reduce_feature_rows(raw, reduction, row_scale, student.scalar_type()), into ? at::empty({0}, student.options()) : grad};
}

std::tuple<at::Tensor, at::Tensor> attention_impl(const at::Tensor& student, const at::Tensor& teacher, double p,
                                                  c10::string_view reduction, bool compute_grad,
                                                  const std::optional<at::Tensor>& grad_scale, at::Tensor* into) {
  constexpr const char* kOp = "attention_transfer_forward";
  check_feature_reduction(reduction, kOp);
  TORCH_CHECK(student.dim() == 3 && student.is_contiguous(),
              "fastkd::attention_transfer_forward: student must be contiguous [B, C, HW]");
  TORCH_CHECK(teacher.dim() == 3 && teacher.is_contiguous() && teacher.size(0) == student.size(0) &&
                  teacher.size(2) == student.size(2),
              "fastkd::attention_transfer_forward: teacher must be contiguous [B, C_t, HW] with the student's B and HW, "
              "got ", teacher.sizes(), " and student ", student.sizes());
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu(),
              "fastkd::attention_transfer_forward (cpu): tensors must be on the CPU");
  TORCH_CHECK(p >= 1 && std::isfinite(p), "fastkd::attention_transfer_forward: p must be a finite number >= 1, got ", p);
  const int64_t n_rows = student.size(0), spatial = student.size(2);
  TORCH_CHECK(n_rows > 0 && student.size(1) > 0 && teacher.size(1) > 0 && spatial > 0,
              "fastkd::attention_transfer_forward: empty feature map (student ", student.sizes(), ", teacher ",
              teacher.sizes(), ")");

  AttentionArgs a;
  const double row_scale = 1.0 / double(spatial);  // the row loss is a mean over HW
  const cpu::GradScale extra = cpu::read_grad_scale(grad_scale, n_rows, kOp);
  const at::Tensor grad = fill_feature_args(a, student, teacher, reduction, row_scale, compute_grad, extra, into, kOp);
  a.s_channels = student.size(1);
  a.t_channels = teacher.size(1);
  a.spatial = spatial;
  a.p = p;
  at::Tensor row_loss = at::empty({n_rows}, student.options().dtype(at::kDouble));
  a.row_loss = row_loss.data_ptr<double>();

  const bool in_double = a.student_dtype == DType::Float64 || a.teacher_dtype == DType::Float64;
  // Two rows of HW entries (Qs, Qt) plus a vector of padding each.
  const size_t scratch_bytes = 2 * size_t(spatial + 16) * (in_double ? sizeof(double) : sizeof(float));
  const auto rows = cpu::pick_isa(avx512::attention_rows, avx2::attention_rows, scalar::attention_rows);
  cpu::parallel_rows(n_rows, a.s_channels * spatial, scratch_bytes,
                     [&](int64_t begin, int64_t end, void* scratch) { rows(a, begin, end, scratch); });
  return {reduce_feature_rows(row_loss, reduction, row_scale, student.scalar_type()), into ? at::empty({0}, student.options()) : grad};
}

std::tuple<at::Tensor, at::Tensor> hint_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                    c10::string_view kind, c10::string_view reduction, bool compute_grad,
                                                    const std::optional<at::Tensor>& grad_scale) {
  return hint_impl(student, teacher, kind, reduction, compute_grad, grad_scale, nullptr);
}

std::tuple<at::Tensor, at::Tensor> attention_transfer_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                                  double p, c10::string_view reduction, bool compute_grad,
                                                                  const std::optional<at::Tensor>& grad_scale) {
  return attention_impl(student, teacher, p, reduction, compute_grad, grad_scale, nullptr);
}

// The gradient into `grad` again, times grad_scale (csrc/ops.cpp); nothing to do when it is 1.
void hint_forward_rescale_cpu(at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher, c10::string_view kind,
                              c10::string_view reduction, const at::Tensor& grad_scale) {
  cpu::rescale_into(grad, student, grad_scale, "hint_forward",
                    [&](at::Tensor* into) { hint_impl(student, teacher, kind, reduction, true, grad_scale, into); });
}

void attention_transfer_forward_rescale_cpu(at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher, double p,
                                            c10::string_view reduction, const at::Tensor& grad_scale) {
  cpu::rescale_into(grad, student, grad_scale, "attention_transfer_forward",
                    [&](at::Tensor* into) { attention_impl(student, teacher, p, reduction, true, grad_scale, into); });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  cpu::impl_with_rescale(m, "hint_forward", &hint_forward_cpu, &hint_forward_rescale_cpu);
  cpu::impl_with_rescale(m, "attention_transfer_forward", &attention_transfer_forward_cpu, &attention_transfer_forward_rescale_cpu);
}

}  // namespace fastkd
