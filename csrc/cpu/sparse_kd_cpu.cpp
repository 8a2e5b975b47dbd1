// CPU implementation of fastkd::sparse_kd_forward: argument checks and the coefficients of one
// call; the instruction-set choice, gradient buffer, row-parallel loop and reduction are the
// shared driver's (cpu_common.h), the row kernel is sparse_kd_kernel.h. Also fastkd::sparse_kd_check,
// the public wrapper's check of the indices (and the uniform tail's kept mass) on CPU.
#include <ATen/ops/empty.h>
#include <ATen/ops/to.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/cpu_common.h"
#include "sparse_kd_args.h"

FASTKD_PER_ISA(void sparse_kd_rows(const SparseKdArgs& a, int64_t begin, int64_t end, void* scratch))

namespace fastkd {
namespace {

constexpr const char* kOp = "sparse_kd_forward";

// The forward, or (into given) the rescale op's recomputation into the forward's gradient.
std::tuple<at::Tensor, at::Tensor> sparse_kd_impl(const at::Tensor& student, const at::Tensor& values, const at::Tensor& indices,
                                                  const std::optional<at::Tensor>& labels, c10::string_view values_kind,
                                                  c10::string_view tail, double temperature, double hard_weight,
                                                  int64_t ignore_index, c10::string_view reduction, bool t2_scale,
                                                  bool compute_grad, const std::optional<at::Tensor>& grad_scale,
                                                  at::Tensor* into) {
  TORCH_CHECK(values_kind == "logits" || values_kind == "logprobs",
              "fastkd::sparse_kd_forward: values must be \"logits\" or \"logprobs\", got \"", values_kind, "\"");
  TORCH_CHECK(tail == "renormalize" || tail == "uniform",
              "fastkd::sparse_kd_forward: tail must be \"renormalize\" or \"uniform\", got \"", tail, "\"");
  TORCH_CHECK(tail != "uniform" || values_kind == "logprobs",
              "fastkd::sparse_kd_forward: tail=\"uniform\" needs values=\"logprobs\"");
  cpu::check_reduction(reduction, kOp);
  TORCH_CHECK(student.dim() == 2 && student.is_contiguous(), "fastkd::sparse_kd_forward: student must be contiguous [N, V]");
  TORCH_CHECK(values.dim() == 2 && values.size(0) == student.size(0) && values.is_contiguous(),
              "fastkd::sparse_kd_forward: values must be contiguous [N, k] with N = ", student.size(0), ", got ", values.sizes());
  TORCH_CHECK(indices.sizes() == values.sizes() && indices.is_contiguous(),
              "fastkd::sparse_kd_forward: indices must be contiguous and shaped like values ", values.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
              "fastkd::sparse_kd_forward: indices must be int64 or int32, got ", indices.scalar_type());
  TORCH_CHECK(values.size(1) >= 1, "fastkd::sparse_kd_forward: the teacher needs k >= 1 entries per row");
  TORCH_CHECK(student.device().is_cpu() && values.device().is_cpu() && indices.device().is_cpu(),
              "fastkd::sparse_kd_forward (cpu): tensors must be on the CPU");
  TORCH_CHECK(temperature > 0, "fastkd::sparse_kd_forward: temperature must be > 0, got ", temperature);
  TORCH_CHECK(hard_weight >= 0 && hard_weight <= 1, "fastkd::sparse_kd_forward: hard_weight must be in [0, 1], got ", hard_weight);
  const cpu::RowCall c = cpu::begin_row_call(student, labels, ignore_index, reduction, compute_grad, grad_scale, into, kOp);
  TORCH_CHECK(hard_weight == 0 || c.labels != nullptr, "fastkd::sparse_kd_forward: hard_weight > 0 needs labels");

  SparseKdArgs a;
  c.fill(a, student, ignore_index, kOp);
  a.values = values.data_ptr();
  a.indices = indices.data_ptr();
  a.indices_int32 = indices.scalar_type() == at::kInt;
  a.values_dtype = cpu::to_dtype(values, kOp, "values");
  a.k = values.size(1);
  a.uniform_tail = tail == "uniform";
  cpu::set_kd_coefs(a, temperature, hard_weight, t2_scale, c.scale);

  cpu::run_rows(cpu::pick_isa(avx512::sparse_kd_rows, avx2::sparse_kd_rows, scalar::sparse_kd_rows), a, c.n_rows, c.vocab,
                sparse_kd_scratch_bytes(c.vocab, compute_size(a.student_dtype, a.student_dtype)));
  return c.finish(reduction, student, into);
}

std::tuple<at::Tensor, at::Tensor> sparse_kd_forward_cpu(const at::Tensor& student, const at::Tensor& values,
                                                         const at::Tensor& indices, const std::optional<at::Tensor>& labels,
                                                         c10::string_view values_kind, c10::string_view tail,
                                                         double temperature, double hard_weight, int64_t ignore_index,
                                                         c10::string_view reduction, bool t2_scale, bool compute_grad,
                                                         const std::optional<at::Tensor>& grad_scale) {
  return sparse_kd_impl(student, values, indices, labels, values_kind, tail, temperature, hard_weight, ignore_index, reduction,
                        t2_scale, compute_grad, grad_scale, nullptr);
}

// The gradient into `grad` again, times grad_scale (csrc/ops.cpp); nothing to do when it is 1.
void sparse_kd_forward_rescale_cpu(at::Tensor& grad, const at::Tensor& student, const at::Tensor& values,
                                   const at::Tensor& indices, const std::optional<at::Tensor>& labels,
                                   c10::string_view values_kind, c10::string_view tail, double temperature,
                                   double hard_weight, int64_t ignore_index, c10::string_view reduction, bool t2_scale,
                                   const at::Tensor& grad_scale) {
  cpu::rescale_into(grad, student, grad_scale, kOp, [&](at::Tensor* into) {
    sparse_kd_impl(student, values, indices, labels, values_kind, tail, temperature, hard_weight, ignore_index, reduction,
                   t2_scale, true, grad_scale, into);
  });
}

// See the schema (csrc/ops.cpp). Single-threaded: [N, k] is small, and an OpenMP region costs more
// than the check on a busy machine.
std::vector<double> sparse_kd_check_cpu(const at::Tensor& values_in, const at::Tensor& indices_in, int64_t vocab,
                                        const std::optional<at::Tensor>& labels, int64_t ignore_index, bool uniform,
                                        double slack_abs, double unit_roundoff) {
  TORCH_CHECK(values_in.sizes() == indices_in.sizes() && values_in.dim() >= 1,
              "fastkd::sparse_kd_check: values and indices must have the same shape [..., k]");
  const int64_t k = values_in.size(-1);
  const int64_t n_rows = k == 0 ? 0 : values_in.numel() / k;
  const at::Tensor indices = indices_in.reshape({n_rows, k}).to(at::kLong).contiguous();
  const at::Tensor values = uniform ? values_in.reshape({n_rows, k}).to(at::kDouble).contiguous() : at::Tensor();
  const int64_t* label_ptr = nullptr;
  at::Tensor label_t;
  if (labels.has_value()) {
    label_t = labels->reshape({-1}).to(at::kLong).contiguous();
    TORCH_CHECK(label_t.numel() == n_rows, "fastkd::sparse_kd_check: labels must hold one label per row");
    label_ptr = label_t.data_ptr<int64_t>();
  }
  const int64_t* idx = indices.data_ptr<int64_t>();
  const double* val = uniform ? values.data_ptr<double>() : nullptr;
  std::vector<int64_t> stamp(size_t(std::max<int64_t>(vocab, 0)), -1);
  for (int64_t r = 0; r < n_rows; ++r) {
    if (label_ptr && label_ptr[r] == ignore_index) continue;
    for (int64_t c = 0; c < k; ++c) {
      const int64_t j = idx[r * k + c];
      if (j < 0 || j >= vocab) return {0.0, double(r), double(c), double(j), 0.0};
      if (stamp[j] == r) return {1.0, double(r), double(c), double(j), 0.0};
      stamp[j] = r;
    }
    if (uniform) {
      double mass = 0, spread = 0;
      for (int64_t c = 0; c < k; ++c) {
        const double v = val[r * k + c];
        const double e = std::exp(v);
        mass += e;
        if (e != 0 && !std::isnan(v)) spread += e * std::abs(v);
      }
      const double slack = slack_abs + 2 * unit_roundoff * spread;
      if (mass > 1 + slack) return {2.0, double(r), 0.0, mass, slack};  // NaN fails: a NaN row, no error
    }
  }
  return {};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  cpu::impl_with_rescale(m, "sparse_kd_forward", &sparse_kd_forward_cpu, &sparse_kd_forward_rescale_cpu);
  m.impl("sparse_kd_check", &sparse_kd_check_cpu);
}

}  // namespace fastkd
