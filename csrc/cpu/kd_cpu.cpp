// CPU implementation of fastkd::kd_forward: argument checks and the coefficients of one call;
// the instruction-set choice, gradient buffer, row-parallel loop and reduction are the shared
// driver's (cpu_common.h). Row kernels: kd_kernel.h (forward KL, one teacher) and
// kd_div_kernel.h (every other divergence, and ensembles of teachers).
#include <ATen/ops/empty.h>
#include <ATen/ops/to.h>
#include <torch/library.h>

#include "cpu/cpu_common.h"
#include "kd_args.h"

FASTKD_PER_ISA(void kd_rows(const KdArgs& a, int64_t begin, int64_t end, void* scratch))
FASTKD_PER_ISA(void kd_div_rows(const KdArgs& a, int64_t begin, int64_t end, void* scratch))

namespace fastkd {

// The divergence named by the op's string, with its beta checked; the endpoints that reduce to
// another divergence become it (jsd at beta 0 is kl, at 1 reverse_kl; the skews at 0 are kl and
// reverse_kl), as TRL's and Liger's JSD do.
Divergence parse_divergence(std::string_view name, double* beta, const char* op) {
  struct Entry {
    const char* name;
    Divergence d;
    bool has_beta;
    bool beta_one_ok;
  };
  static constexpr Entry kTable[] = {
      {"kl", Divergence::KL, false, false},           {"reverse_kl", Divergence::ReverseKL, false, false},
      {"jsd", Divergence::JSD, true, true},           {"tvd", Divergence::TVD, false, false},
      {"skew_kl", Divergence::SkewKL, true, false},   {"skew_reverse_kl", Divergence::SkewReverseKL, true, false},
  };
  for (const Entry& e : kTable) {
    if (name != e.name) continue;
    if (!e.has_beta) return e.d;
    const double b = *beta;
    TORCH_CHECK(b >= 0 && (e.beta_one_ok ? b <= 1 : b < 1), op, ": beta must be in [0, ", e.beta_one_ok ? "1]" : "1)",
                " for divergence ", e.name, ", got ", b);
    if (b == 0) return e.d == Divergence::SkewReverseKL ? Divergence::ReverseKL : Divergence::KL;
    if (b == 1) return Divergence::ReverseKL;  // jsd
    return e.d;
  }
  TORCH_CHECK(false, op, ": divergence must be one of kl, reverse_kl, jsd, tvd, skew_kl, skew_reverse_kl, got \"",
              std::string(name), "\"");
}

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
  const int64_t n_rows = student.size(0), vocab = student.size(1);
  const int64_t* label_ptr = nullptr;
  const int64_t n_valid = cpu::count_valid_rows(labels, n_rows, ignore_index, kOp, &label_ptr);
  TORCH_CHECK(hard_weight == 0 || label_ptr != nullptr, "fastkd::kd_forward: hard_weight > 0 needs labels");

  const cpu::GradScale extra = cpu::read_grad_scale(grad_scale, n_rows, kOp);
  const double scale = cpu::reduction_scale(reduction, n_valid) * extra.scalar;
  const double alpha = hard_weight;
  at::Tensor row_loss = at::empty({n_rows}, student.options().dtype(at::kDouble));
  at::Tensor grad = compute_grad ? cpu::grad_buffer(student, into, kOp) : at::empty({0}, student.options());

  KdArgs a;
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
  a.n_teachers = n_teachers;
  a.teacher_weights = weights.defined() ? weights.const_data_ptr<double>() : nullptr;
  a.divergence = dv;
  a.beta = b;
  a.inv_temperature = 1.0 / temperature;
  a.soft_loss_coef = (1 - alpha) * (t2_scale ? temperature * temperature : 1.0);
  a.soft_grad_coef = (1 - alpha) * (t2_scale ? temperature : 1.0 / temperature) * scale;
  a.hard_weight = alpha;
  a.hard_grad_coef = alpha * scale;
  a.grad_row_scale = extra.row_ptr();
  a.stream_grad = compute_grad && grad.nbytes() >= cpu::kLargeGradBytes;

  const bool in_double = a.student_dtype == DType::Float64 || a.teacher_dtype == DType::Float64;
  const size_t compute_size = in_double ? sizeof(double) : sizeof(float);
  if (dv == Divergence::KL && n_teachers == 1) {
    // Each task keeps a row's exponentials in its own scratch (2 x (V + one vector) entries).
    const size_t scratch_bytes = 2 * size_t(vocab + 16) * compute_size;
    const auto rows = cpu::pick_isa(avx512::kd_rows, avx2::kd_rows, scalar::kd_rows);
    cpu::parallel_rows(n_rows, vocab, scratch_bytes, [&](int64_t begin, int64_t end, void* scratch) { rows(a, begin, end, scratch); });
  } else {
    const size_t scratch_bytes = kd_div_scratch_bytes(vocab, n_teachers, compute_size);
    const auto rows = cpu::pick_isa(avx512::kd_div_rows, avx2::kd_div_rows, scalar::kd_div_rows);
    cpu::parallel_rows(n_rows, vocab * n_teachers, scratch_bytes,
                       [&](int64_t begin, int64_t end, void* scratch) { rows(a, begin, end, scratch); });
  }
  return {cpu::reduce_rows(row_loss, reduction, n_valid, student.scalar_type()), into ? at::empty({0}, student.options()) : grad};
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
  if (cpu::read_grad_scale(grad_scale, student.size(0), kOp).is_one()) return;
  kd_impl(student, teacher, labels, teacher_weights, divergence, beta, temperature, hard_weight, ignore_index, reduction,
          t2_scale, true, grad_scale, &grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("kd_forward", &kd_forward_cpu);
  m.impl("kd_forward_rescale_", &kd_forward_rescale_cpu);
}

}  // namespace fastkd
