// CPU implementation of fastkd::kd_forward: argument checks and the coefficients of one call;
// the instruction-set choice, gradient buffer, row-parallel loop and reduction are the shared
// driver's (cpu_common.h). Row kernels: kd_kernel.h (forward KL, one teacher) and
// divergence_kernel.h (every other divergence, and ensembles of teachers); the divergence rules
// are divergence.h's.
#include <ATen/ops/empty.h>
#include <ATen/ops/to.h>
#include <torch/library.h>

#include "cpu/cpu_common.h"
#include "divergence.h"
#include "kd_args.h"

FASTKD_PER_ISA(void kd_rows(const KdArgs& a, int64_t begin, int64_t end, void* scratch))
FASTKD_PER_ISA(void divergence_rows(const KdArgs& a, int64_t begin, int64_t end, void* scratch))

namespace fastkd {

namespace {

constexpr const char* kOp = "kd_forward";

// The forward, or (into given) the rescale op's recomputation into the forward's gradient.
std::tuple<at::Tensor, at::Tensor> kd_impl(const at::Tensor& student, const at::Tensor& teacher,
                                           const std::optional<at::Tensor>& labels,
                                           const std::optional<at::Tensor>& teacher_weights, c10::string_view divergence,
                                           double beta, double temperature, double hard_weight, int64_t ignore_index,
                                           c10::string_view reduction, bool t2_scale, bool compute_grad,
                                           const std::optional<at::Tensor>& grad_scale, at::Tensor* into) {
  double b = beta;
  const Divergence dv = parse_divergence(divergence, &b, "fastkd::kd_forward");
  cpu::check_reduction(reduction, kOp);
  TORCH_CHECK(student.dim() == 2 && student.is_contiguous(), "fastkd::kd_forward: student must be contiguous [N, V]");
  const bool ensemble = teacher.dim() == 3;
  TORCH_CHECK(teacher.is_contiguous() && (ensemble ? teacher.sizes().slice(1) == student.sizes() : teacher.sizes() == student.sizes()),
              "fastkd::kd_forward: teacher must be contiguous and shaped like student ", student.sizes(),
              " or [M, ", student.size(0), ", ", student.size(1), "], got ", teacher.sizes());
  const int64_t n_teachers = ensemble ? teacher.size(0) : 1;
  TORCH_CHECK(n_teachers >= 1, "fastkd::kd_forward: teacher holds no teachers (M = 0)");
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu(), "fastkd::kd_forward (cpu): tensors must be on the CPU");
  TORCH_CHECK(temperature > 0, "fastkd::kd_forward: temperature must be > 0, got ", temperature);
  TORCH_CHECK(hard_weight >= 0 && hard_weight <= 1, "fastkd::kd_forward: hard_weight must be in [0, 1], got ", hard_weight);
  at::Tensor weights;
  if (teacher_weights.has_value()) {
    const at::Tensor& w = *teacher_weights;
    TORCH_CHECK(w.dim() == 1 && w.size(0) == n_teachers && w.device().is_cpu() && at::isFloatingType(w.scalar_type()),
                "fastkd::kd_forward: teacher_weights must be a float CPU tensor of shape [", n_teachers, "], got ",
                w.scalar_type(), " ", w.sizes(), " on ", w.device());
    weights = w.to(at::kDouble).contiguous();
  }
  const cpu::RowCall c = cpu::begin_row_call(student, labels, ignore_index, reduction, compute_grad, grad_scale, into, kOp);
  TORCH_CHECK(hard_weight == 0 || c.labels != nullptr, "fastkd::kd_forward: hard_weight > 0 needs labels");

  KdArgs a;
  c.fill(a, student, ignore_index, kOp);
  a.teacher = teacher.data_ptr();
  a.teacher_dtype = cpu::to_dtype(teacher, kOp, "teacher");
  a.n_teachers = n_teachers;
  a.teacher_weights = weights.defined() ? weights.const_data_ptr<double>() : nullptr;
  a.divergence = dv;
  a.beta = b;
  cpu::set_kd_coefs(a, temperature, hard_weight, t2_scale, c.scale);

  const size_t cs = compute_size(a.student_dtype, a.teacher_dtype);
  if (dv == Divergence::KL && n_teachers == 1) {
    // Two scratch rows per row, and with a gradient two more for the row whose gradient waits
    // (kd_kernel.h).
    cpu::run_rows(cpu::pick_isa(avx512::kd_rows, avx2::kd_rows, scalar::kd_rows), a, c.n_rows, c.vocab,
                  (c.compute_grad ? 4 : 2) * scratch_row_bytes(c.vocab, cs));
  } else {
    cpu::run_rows(cpu::pick_isa(avx512::divergence_rows, avx2::divergence_rows, scalar::divergence_rows), a, c.n_rows,
                  c.vocab * n_teachers, divergence_scratch_bytes(c.vocab, n_teachers, cs));
  }
  return c.finish(reduction, student, into);
}

std::tuple<at::Tensor, at::Tensor> kd_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                  const std::optional<at::Tensor>& labels,
                                                  const std::optional<at::Tensor>& teacher_weights,
                                                  c10::string_view divergence, double beta, double temperature,
                                                  double hard_weight, int64_t ignore_index, c10::string_view reduction,
                                                  bool t2_scale, bool compute_grad, const std::optional<at::Tensor>& grad_scale) {
  return kd_impl(student, teacher, labels, teacher_weights, divergence, beta, temperature, hard_weight, ignore_index, reduction,
                 t2_scale, compute_grad, grad_scale, nullptr);
}

// The gradient into `grad` again, times grad_scale (csrc/ops.cpp); nothing to do when it is 1.
void kd_forward_rescale_cpu(at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
                            const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& teacher_weights,
                            c10::string_view divergence, double beta, double temperature, double hard_weight,
                            int64_t ignore_index, c10::string_view reduction, bool t2_scale, const at::Tensor& grad_scale) {
  cpu::rescale_into(grad, student, grad_scale, kOp, [&](at::Tensor* into) {
    kd_impl(student, teacher, labels, teacher_weights, divergence, beta, temperature, hard_weight, ignore_index, reduction,
            t2_scale, true, grad_scale, into);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  cpu::impl_with_rescale(m, "kd_forward", &kd_forward_cpu, &kd_forward_rescale_cpu);
}

}  // namespace fastkd
