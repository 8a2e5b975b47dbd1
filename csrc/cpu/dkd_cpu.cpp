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
  const cpu::RowCall c = cpu::begin_row_call(student, labels, ignore_index, reduction, compute_grad, grad_scale, into, kOp);

  DkdArgs a;
  c.fill(a, student, ignore_index, kOp);
  a.teacher = teacher.data_ptr();
  a.teacher_dtype = cpu::to_dtype(teacher, kOp, "teacher");
  a.inv_temperature = 1.0 / temperature;
  a.tckd_loss_coef = alpha * temperature * temperature;
  a.nckd_loss_coef = beta * temperature * temperature;
  a.alpha_grad_coef = alpha * temperature * c.scale;
  a.beta_grad_coef = beta * temperature * c.scale;

  // Each task keeps a row's two exponential rows in its own scratch.
  cpu::run_rows(cpu::pick_isa(avx512::dkd_rows, avx2::dkd_rows, scalar::dkd_rows), a, c.n_rows, c.vocab,
                2 * scratch_row_bytes(c.vocab, compute_size(a.student_dtype, a.teacher_dtype)));
  return c.finish(reduction, student, into);
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
  cpu::rescale_into(grad, student, grad_scale, kOp, [&](at::Tensor* into) {
    dkd_impl(student, teacher, labels, temperature, alpha, beta, ignore_index, reduction, true, grad_scale, into);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  cpu::impl_with_rescale(m, "dkd_forward", &dkd_forward_cpu, &dkd_forward_rescale_cpu);
}

}  // namespace fastkd
