// CPU implementation of fastkd::kd_forward: argument checks and the coefficients of one call;
// the instruction-set choice, gradient buffer, row-parallel loop and reduction are the shared
// driver's (cpu_common.h), the row kernel is kd_kernel.h.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu/cpu_common.h"
#include "kd_args.h"

FASTKD_PER_ISA(void kd_rows(const KdArgs& a, int64_t begin, int64_t end, void* scratch))

namespace fastkd {
namespace {

constexpr const char* kOp = "kd_forward";

std::tuple<at::Tensor, at::Tensor> kd_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                  const std::optional<at::Tensor>& labels, c10::string_view divergence,
                                                  double temperature, double hard_weight, int64_t ignore_index,
                                                  c10::string_view reduction, bool t2_scale, bool compute_grad) {
  TORCH_CHECK(divergence == "kl", "fastkd::kd_forward: divergence must be \"kl\", got \"", divergence, "\"");
  cpu::check_reduction(reduction, kOp);
  TORCH_CHECK(student.dim() == 2 && student.is_contiguous(), "fastkd::kd_forward: student must be contiguous [N, V]");
  TORCH_CHECK(teacher.sizes() == student.sizes() && teacher.is_contiguous(),
              "fastkd::kd_forward: teacher must be contiguous and shaped like student ", student.sizes());
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu(), "fastkd::kd_forward (cpu): tensors must be on the CPU");
  TORCH_CHECK(temperature > 0, "fastkd::kd_forward: temperature must be > 0, got ", temperature);
  TORCH_CHECK(hard_weight >= 0 && hard_weight <= 1, "fastkd::kd_forward: hard_weight must be in [0, 1], got ", hard_weight);
  const int64_t n_rows = student.size(0), vocab = student.size(1);
  const int64_t* label_ptr = nullptr;
  const int64_t n_valid = cpu::count_valid_rows(labels, n_rows, ignore_index, kOp, &label_ptr);
  TORCH_CHECK(hard_weight == 0 || label_ptr != nullptr, "fastkd::kd_forward: hard_weight > 0 needs labels");

  const double scale = cpu::reduction_scale(reduction, n_valid);
  const double alpha = hard_weight;
  at::Tensor row_loss = at::empty({n_rows}, student.options().dtype(at::kDouble));
  at::Tensor grad = compute_grad ? cpu::new_grad_buffer(student) : at::empty({0}, student.options());

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
  a.inv_temperature = 1.0 / temperature;
  a.soft_loss_coef = (1 - alpha) * (t2_scale ? temperature * temperature : 1.0);
  a.soft_grad_coef = (1 - alpha) * (t2_scale ? temperature : 1.0 / temperature) * scale;
  a.hard_weight = alpha;
  a.hard_grad_coef = alpha * scale;
  a.stream_grad = compute_grad && grad.nbytes() >= cpu::kLargeGradBytes;

  const bool in_double = a.student_dtype == DType::Float64 || a.teacher_dtype == DType::Float64;
  // Each task keeps a row's exponentials in its own scratch (2 x (V + one vector) entries).
  const size_t scratch_bytes = 2 * size_t(vocab + 16) * (in_double ? sizeof(double) : sizeof(float));
  const auto rows = cpu::pick_isa(avx512::kd_rows, avx2::kd_rows, scalar::kd_rows);
  cpu::parallel_rows(n_rows, vocab, scratch_bytes, [&](int64_t begin, int64_t end, void* scratch) { rows(a, begin, end, scratch); });
  return {cpu::reduce_rows(row_loss, reduction, n_valid, student.scalar_type()), grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("kd_forward", &kd_forward_cpu); }

}  // namespace fastkd
