// The fastkd op schemas, defined once. Each device registers its kernels with
// TORCH_LIBRARY_IMPL beside the kernel (csrc/cpu, csrc/cuda); the fake (meta) kernels and the
// autograd formulas are registered from Python, beside the public wrapper (fastkd/ops/).
#include <Python.h>
#include <torch/library.h>

#include <string>

namespace fastkd {
std::string cpu_isa();      // csrc/cpu/cpu_common.cpp
int64_t cpu_empty_cache();  // csrc/cpu/cpu_common.cpp
}

extern "C" {
// `import fastkd._C` loads this library, which runs the registrations below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}

TORCH_LIBRARY(fastkd, m) {
  // Fused temperature KD: per-row loss and the gradient w.r.t. the student in one pass.
  //   student: [N, V] contiguous; teacher: [N, V], or [M, N, V] for an ensemble of M teachers
  //   (p = sum_m w_m softmax(t_m / T)), contiguous; labels: [N] int64 or None;
  //   teacher_weights: [M] float (non-negative, summing to 1) or None for uniform weights.
  //   divergence: "kl" | "reverse_kl" | "jsd" | "tvd" | "skew_kl" | "skew_reverse_kl" between
  //   the teacher p and the student q (fastkd/ops/kd.py); beta: the divergence's beta (jsd in
  //   [0, 1], the skews in [0, 1)), ignored by the others.
  //   reduction: "none" | "sum" | "batchmean"; the returned gradient already carries the
  //   reduction's scale, so the backward only applies grad_output (see grad_scale below).
  //   Returns (loss, grad): loss float32 (float64 for a float64 student), [N] for "none" else
  //   a scalar; grad [N, V] in the student's dtype, or an empty [0] tensor when compute_grad
  //   is false.
  //   grad_scale (every fused op below has it, last): None, or a float tensor of 1 or N (one
  //   per row) elements on the student's device that the gradient is multiplied by before its
  //   one rounding to the student's dtype: the backward's grad_output (fastkd/ops/fused_autograd.py).
  //   It changes neither the loss nor the reduction's own scale.
  m.def(
      "kd_forward(Tensor student, Tensor teacher, Tensor? labels, Tensor? teacher_weights, str divergence, "
      "float beta, float temperature, float hard_weight, int ignore_index, str reduction, bool t2_scale, "
      "bool compute_grad, Tensor? grad_scale=None) -> (Tensor, Tensor)");
  // <op>_rescale_ (one per fused op with a reduction): the backward of a 16-bit student when
  // grad_output is not known to be 1. `grad` is the gradient <op> returned for the same
  // arguments; it is recomputed in place with grad_scale folded in (as <op>(..., True,
  // grad_scale) would return it), except that a row whose grad_scale is exactly 1 is left as it
  // is: a program reads its scale on the device and returns, so grad_output == 1 costs no
  // traffic and no host synchronisation. The arguments are <op>'s without compute_grad.
  m.def(
      "kd_forward_rescale_(Tensor(a!) grad, Tensor student, Tensor teacher, Tensor? labels, Tensor? teacher_weights, "
      "str divergence, float beta, float temperature, float hard_weight, int ignore_index, str reduction, "
      "bool t2_scale, Tensor grad_scale) -> ()");
  // Relational KD (fastkd/ops/relational.py): one scalar loss per batch and its gradient
  // w.r.t. the student, computed together.
  //   student: [B, D] contiguous, teacher: [B, Dt] contiguous (same B, any float dtypes).
  //   Returns (loss, grad): loss a float32 scalar (float64 for a float64 student); grad [B, D]
  //   in the student's dtype, or an empty [0] tensor when compute_grad is false.
  // RKD distance and angle (Park et al. 2019) need B >= 2; SP (Tung & Mori 2019, L2 rows) and
  // PKT (Passalis & Tefas 2018, eps > 0) accept B >= 1.
  m.def("rkd_distance_forward(Tensor student, Tensor teacher, bool compute_grad) -> (Tensor, Tensor)");
  m.def("rkd_angle_forward(Tensor student, Tensor teacher, bool compute_grad) -> (Tensor, Tensor)");
  m.def("sp_forward(Tensor student, Tensor teacher, bool compute_grad) -> (Tensor, Tensor)");
  m.def("pkt_forward(Tensor student, Tensor teacher, float eps, bool compute_grad) -> (Tensor, Tensor)");
  // Fused decoupled KD (Zhao et al. 2022): per-row loss and the gradient w.r.t. the student in
  // one pass. loss = T^2 (alpha * TCKD + beta * NCKD) per row (fastkd/ops/dkd.py).
  //   student, teacher: [N, V] contiguous, V >= 2; labels: [N] int64, required (the target).
  //   reduction, compute_grad and the returned (loss, grad): as kd_forward.
  m.def(
      "dkd_forward(Tensor student, Tensor teacher, Tensor labels, float temperature, float alpha, "
      "float beta, int ignore_index, str reduction, bool compute_grad, Tensor? grad_scale=None) -> (Tensor, Tensor)");
  m.def(
      "dkd_forward_rescale_(Tensor(a!) grad, Tensor student, Tensor teacher, Tensor labels, float temperature, "
      "float alpha, float beta, int ignore_index, str reduction, Tensor grad_scale) -> ()");
  // Fused KD against a sparse teacher, known at k entries per row (top-k logits or log-probs).
  //   student: [N, V] contiguous; values: [N, k] float, contiguous; indices: [N, k] int64 or
  //   int32, contiguous, each row's k indices distinct and in [0, V) (a row that breaks this gets
  //   a NaN loss and gradient); labels: [N] int64 or None.
  //   values_kind: "logits" | "logprobs"; tail: "renormalize" (the teacher is softmax(values/T)
  //   over its k entries) | "uniform" (needs "logprobs": the missing mass is spread evenly over
  //   the other V - k entries, then p is proportional to exp(logprob/T) over the full row).
  //   The student is normalised over the full vocabulary. Everything else as kd_forward.
  m.def(
      "sparse_kd_forward(Tensor student, Tensor values, Tensor indices, Tensor? labels, str values_kind, "
      "str tail, float temperature, float hard_weight, int ignore_index, str reduction, bool t2_scale, "
      "bool compute_grad, Tensor? grad_scale=None) -> (Tensor, Tensor)");
  m.def(
      "sparse_kd_forward_rescale_(Tensor(a!) grad, Tensor student, Tensor values, Tensor indices, Tensor? labels, "
      "str values_kind, str tail, float temperature, float hard_weight, int ignore_index, str reduction, "
      "bool t2_scale, Tensor grad_scale) -> ()");
  // Fused hint (FitNets) loss between equal-shape features, flattened to [B, D] rows (samples).
  //   kind: "mse" | "l1" | "smooth_l1" (beta 1) | "cosine" (1 - cos per row) | "normalized_mse"
  //   (mse of the L2-normalised rows). reduction: "mean" (over all B*D entries; over rows for
  //   cosine) | "sum" | "none" (per row: the mean over its entries; 1 - cos for cosine).
  //   Returns (loss, grad) as kd_forward does: grad [B, D] in the student's dtype, already
  //   carrying the reduction's scale, or an empty [0] tensor when compute_grad is false.
  m.def(
      "hint_forward(Tensor student, Tensor teacher, str kind, str reduction, bool compute_grad, "
      "Tensor? grad_scale=None) -> (Tensor, Tensor)");
  m.def(
      "hint_forward_rescale_(Tensor(a!) grad, Tensor student, Tensor teacher, str kind, str reduction, "
      "Tensor grad_scale) -> ()");
  // Fused attention transfer (Zagoruyko & Komodakis) for one pair of feature maps:
  //   student [B, C_s, HW], teacher [B, C_t, HW] contiguous; a(x) = normalize_HW(mean_C |x|^p);
  //   per row: mean over HW of (a_s - a_t)^2. reduction: "mean" (over B and HW) | "sum" |
  //   "none" (per row). p: finite, >= 1. Returns (loss, grad) as hint_forward does.
  m.def(
      "attention_transfer_forward(Tensor student, Tensor teacher, float p, str reduction, bool compute_grad, "
      "Tensor? grad_scale=None) -> (Tensor, Tensor)");
  m.def(
      "attention_transfer_forward_rescale_(Tensor(a!) grad, Tensor student, Tensor teacher, float p, str reduction, "
      "Tensor grad_scale) -> ()");
  // The CPU argument check of sparse_kd_loss, in one pass over [N, k] (the Python wrapper calls it
  // outside torch.compile): the first problem in a row not ignored, as [kind, row, column, value,
  // slack], or [] when there is none. kind 0: an index outside [0, vocab); 1: an index repeated
  // (value: the index); 2 (uniform only): a kept mass sum exp(values) above 1 + slack, with
  // slack = slack_abs + 2 * unit_roundoff * sum exp(v) |v| (value: the mass).
  m.def(
      "sparse_kd_check(Tensor values, Tensor indices, int vocab, Tensor? labels, int ignore_index, bool uniform, "
      "float slack_abs, float unit_roundoff) -> float[]");
  // The instruction set the CPU kernels use here: "avx512", "avx2" or "scalar".
  m.def("cpu_isa() -> str", &fastkd::cpu_isa);
  // Drops the CPU kernels' cached gradient buffer; returns the bytes it held.
  m.def("cpu_empty_cache() -> int", &fastkd::cpu_empty_cache);
  // Whether the CUDA sources were compiled into this build (tests check that their kernels
  // registered: a silently skipped CUDA build must not pass for a working one).
  m.def("built_with_cuda() -> bool", [] {
#ifdef FASTKD_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
