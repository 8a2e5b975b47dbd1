// CPU implementation of fastkd::dkd_forward: argument checks and the coefficients of one call;
// the instruction-set choice, gradient buffer, row-parallel loop and reduction are the shared
// driver's (cpu_common.h), the row kernel is dkd_kernel.h.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>

#include "cpu/cpu_common.h"
#include "dkd_args.h"

FASTKD_PER_ISA(void dkd_rows(const DkdArgs& a, int64_t begin, int64_t end, void* scratch))

namespace fastkd {
namespace {

constexpr const char* kOp = "dkd_forward";

// The forward, or (into given) the rescale op's recomputation into the forward's gradient.
std::tuple<at::Tensor, at::Tensor> dkd_impl(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                                            double temperature, double alpha, double beta, int64_t ignore_index,
                                            c10::string_view reduction, bool compute_grad,
                                            const std::optional<at::Tensor>& grad_scale, at::Tensor* into) {
  cpu::check_reduction(reduction, kOp);
  TORCH_CHECK(student.dim() == 2 && student.is_contiguous(), "fastkd::dkd_forward: student must be contiguous [N, V]");
  TORCH_CHECK(teacher.sizes() == student.sizes() && teacher.is_contiguous(),
              "fastkd::dkd_forward: teacher must be contiguous and shaped like student ", student.sizes());
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu(), "fastkd::dkd_forward (cpu): tensors must be on the CPU");
  TORCH_CHECK(student.size(1) >= 2, "fastkd::dkd_forward: DKD needs at least 2 classes, got V = ", student.size(1));
  TORCH_CHECK(temperature > 0, "fastkd::dkd_forward: temperature must be > 0, got ", temperature);
  TORCH_CHECK(alpha >= 0 && std::isfinite(alpha), "fastkd::dkd_forward: alpha must be finite and >= 0, got ", alpha);
  TORCH_CHECK(beta >= 0 && std::isfinite(beta), "fastkd::dkd_forward: beta must be finite and >= 0, got ", beta);
  const int64_t n_rows = student.size(0), vocab = student.size(1);
  const int64_t* label_ptr = nullptr;
  const int64_t n_valid = cpu::count_valid_rows(labels, n_rows, ignore_index, kOp, &label_ptr);

  const cpu::GradScale extra = cpu::read_grad_scale(grad_scale, n_rows, kOp);
  const double scale = cpu::reduction_scale(reduction, n_valid) * extra.scalar;
  at::Tensor row_loss = at::empty({n_rows}, student.options().dtype(at::kDouble));
  at::Tensor grad = compute_grad ? cpu::grad_buffer(student, into, kOp) : at::empty({0}, student.options());

  DkdArgs a;
  a.student = student.data_ptr();
  a.teacher = teacher.data_ptr();
  a.labels = label_ptr;
  a.grad = compute_grad ? grad.data_ptr() : nullptr;
  a.row_loss = row_loss.data_ptr<double>();
  a.student_dtype = cpu::to_dtype(student, kOp, "student");
  a.teacher_dtype = cpu::to_dtype(teacher, kOp, "teacher");
  a.n_rows = n_rows;
  a.vocab = vocab;
  a.ignore_index = ignore_index;
  a.inv_temperature = 1.0 / temperature;
  a.tckd_loss_coef = alpha * temperature * temperature;
  a.nckd_loss_coef = beta * temperature * temperature;
  a.alpha_grad_coef = alpha * temperature * scale;
  a.beta_grad_coef = beta * temperature * scale;
  a.grad_row_scale = extra.row_ptr();
  a.stream_grad = compute_grad && grad.nbytes() >= cpu::kLargeGradBytes;

  const bool in_double = a.student_dtype == DType::Float64 || a.teacher_dtype == DType::Float64;
  // Each task keeps a row's exponentials in its own scratch (2 x (V + one vector) entries).
  const size_t scratch_bytes = 2 * size_t(vocab + 16) * (in_double ? sizeof(double) : sizeof(float));
  const auto rows = cpu::pick_isa(avx512::dkd_rows, avx2::dkd_rows, scalar::dkd_rows);
  cpu::parallel_rows(n_rows, vocab, scratch_bytes, [&](int64_t begin, int64_t end, void* scratch) { rows(a, begin, end, scratch); });
  return {cpu::reduce_rows(row_loss, reduction, n_valid, student.scalar_type()), into ? at::empty({0}, student.options()) : grad};
}

std::tuple<at::Tensor, at::Tensor> dkd_forward_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                                                   double temperature, double alpha, double beta, int64_t ignore_index,
                                                   c10::string_view reduction, bool compute_grad,
                                                   const std::optional<at::Tensor>& grad_scale) {
  return dkd_impl(student, teacher, labels, temperature, alpha, beta, ignore_index, reduction, compute_grad, grad_scale, nullptr);
}

// The gradient into `grad` again, times grad_scale (csrc/ops.cpp); nothing to do when it is 1.
void dkd_forward_rescale_cpu(at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                             double temperature, double alpha, double beta, int64_t ignore_index, c10::string_view reduction,
                             const at::Tensor& grad_scale) {
  if (cpu::read_grad_scale(grad_scale, student.size(0), kOp).is_one()) return;
  dkd_impl(student, teacher, labels, temperature, alpha, beta, ignore_index, reduction, true, grad_scale, &grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("dkd_forward", &dkd_forward_cpu);
  m.impl("dkd_forward_rescale_", &dkd_forward_rescale_cpu);
}

}  // namespace fastkd
