// CPU implementation of fastkd::kd_forward: checks, allocation, the instruction-set choice and
// the row-parallel loop around the row kernel (kd_kernel.h, one build per instruction set).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/to.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>

#include "kd_args.h"

namespace fastkd {
namespace avx512 {
void kd_rows(const KdArgs& a, int64_t begin, int64_t end, void* scratch);
}
namespace avx2 {
void kd_rows(const KdArgs& a, int64_t begin, int64_t end, void* scratch);
}
namespace scalar {
void kd_rows(const KdArgs& a, int64_t begin, int64_t end, void* scratch);
void kd_rows_double(const KdArgs& a, int64_t begin, int64_t end, void* scratch);
}  // namespace scalar

namespace {

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2 };
const char* const kIsaNames[] = {"scalar", "avx2", "avx512"};

Isa best_isa() {
  static const Isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return Isa::Avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      return Isa::Avx2;
    return Isa::Scalar;
  }();
  return best;
}

// FASTKD_CPU_ISA=avx512|avx2|scalar forces a narrower instruction set (tests run every build of
// the kernel on one machine this way); asking for one the CPU lacks is an error.
Isa selected_isa() {
  const char* env = std::getenv("FASTKD_CPU_ISA");
  if (env == nullptr || *env == '\0') return best_isa();
  const std::string want(env);
  for (int i = 0; i < 3; ++i) {
    if (want == kIsaNames[i]) {
      TORCH_CHECK(i <= int(best_isa()), "FASTKD_CPU_ISA=", want, " but this CPU supports at most ",
                  kIsaNames[int(best_isa())]);
      return Isa(i);
    }
  }
  TORCH_CHECK(false, "FASTKD_CPU_ISA=", want, " is not one of avx512, avx2, scalar");
}

DType to_dtype(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kBFloat16: return DType::BFloat16;
    case at::kHalf: return DType::Float16;
    case at::kDouble: return DType::Float64;
    default: TORCH_CHECK(false, "fastkd::kd_forward: ", name, " must be float32, bfloat16, float16 or float64, got ", x.scalar_type());
  }
}

// Asks the kernel to back a large fresh buffer with 2 MB pages before it is first written. With
// 4 KB pages, the first-touch faults of a 262 MB gradient cost ~100 ms here, more than the
// kernel itself; the advice is only a hint, so failure is harmless.
void advise_huge_pages(void* ptr, size_t bytes) {
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < 2 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
}

// A gradient of at least this many bytes is "large": it will have left the caches by the time
// the backward reads it (so it is written with non-temporal stores), and a fresh one costs
// noticeable page faults (so its buffer is kept for reuse).
constexpr size_t kLargeGradBytes = size_t(8) << 20;

// The gradient buffer of a large call is kept after its last user lets go, and handed out again
// to the next call of the same shape and dtype. The CPU allocator returns large blocks to the
// operating system, and every fresh block is faulted in and zeroed page by page on first write:
// about 24 ms for a 250 MB gradient even on 2 MB pages, as much as the kernel's own work. A
// training loop asks for the same gradient shape every step, so one slot suffices; it holds at
// most one gradient while idle (fastkd.empty_cache() frees it). FASTKD_CPU_GRAD_CACHE=0 turns
// it off.
struct GradCache {
  std::mutex mutex;
  at::Tensor slot;  // never handed out itself: callers get a new tensor on its storage
};

GradCache& grad_cache() {
  // Never destroyed: freeing the slot at exit could run after the allocator it came from.
  static GradCache& cache = *new GradCache();
  return cache;
}

at::Tensor new_grad_buffer(const at::Tensor& student) {
  const size_t bytes = size_t(student.numel()) * student.element_size();
  static const bool enabled = [] {
    const char* env = std::getenv("FASTKD_CPU_GRAD_CACHE");
    return env == nullptr || std::string(env) != "0";
  }();
  auto fresh = [&] {
    at::Tensor t = at::empty_like(student);
    advise_huge_pages(t.data_ptr(), bytes);
    return t;
  };
  if (!enabled || bytes < kLargeGradBytes) return fresh();
  GradCache& cache = grad_cache();
  std::lock_guard<std::mutex> lock(cache.mutex);
  at::Tensor& slot = cache.slot;
  const bool idle = slot.defined() && slot.use_count() == 1 && slot.storage().use_count() == 1;
  if (!(idle && slot.sizes() == student.sizes() && slot.dtype() == student.dtype())) {
    // Keep the newest buffer: one still in use (e.g. a .grad that gradients accumulate into)
    // is left to its users, and this one, once autograd has added it there, is free next step.
    slot = fresh();
  }
  // A distinct tensor on the slot's storage: autograd can then move it into .grad as its own.
  return at::empty({0}, student.options()).set_(slot.storage(), 0, slot.sizes(), slot.strides());
}

}  // namespace

std::string cpu_isa() { return kIsaNames[int(selected_isa())]; }

int64_t cpu_empty_cache() {
  GradCache& cache = grad_cache();
  std::lock_guard<std::mutex> lock(cache.mutex);
  if (!cache.slot.defined()) return 0;
  const int64_t bytes = int64_t(cache.slot.nbytes());
  cache.slot = at::Tensor();  // the memory goes back once its last user lets go
  return bytes;
}

std::tuple<at::Tensor, at::Tensor> kd_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                  const std::optional<at::Tensor>& labels, c10::string_view divergence,
                                                  double temperature, double hard_weight, int64_t ignore_index,
                                                  c10::string_view reduction, bool t2_scale, bool compute_grad) {
  TORCH_CHECK(divergence == "kl", "fastkd::kd_forward: divergence must be \"kl\", got \"", divergence, "\"");
  TORCH_CHECK(reduction == "none" || reduction == "sum" || reduction == "batchmean",
              "fastkd::kd_forward: reduction must be none, sum or batchmean, got \"", reduction, "\"");
  TORCH_CHECK(student.dim() == 2 && student.is_contiguous(), "fastkd::kd_forward: student must be contiguous [N, V]");
  TORCH_CHECK(teacher.sizes() == student.sizes() && teacher.is_contiguous(),
              "fastkd::kd_forward: teacher must be contiguous and shaped like student ", student.sizes());
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu(), "fastkd::kd_forward (cpu): tensors must be on the CPU");
  TORCH_CHECK(temperature > 0, "fastkd::kd_forward: temperature must be > 0, got ", temperature);
  TORCH_CHECK(hard_weight >= 0 && hard_weight <= 1, "fastkd::kd_forward: hard_weight must be in [0, 1], got ", hard_weight);
  const int64_t n_rows = student.size(0), vocab = student.size(1);
  const int64_t* label_ptr = nullptr;
  int64_t n_valid = n_rows;
  if (labels.has_value()) {
    const at::Tensor& y = *labels;
    TORCH_CHECK(y.dim() == 1 && y.size(0) == n_rows && y.scalar_type() == at::kLong && y.is_contiguous() && y.device().is_cpu(),
                "fastkd::kd_forward: labels must be a contiguous int64 CPU tensor of shape [", n_rows, "]");
    label_ptr = y.data_ptr<int64_t>();
    n_valid = 0;
    for (int64_t i = 0; i < n_rows; ++i) n_valid += label_ptr[i] != ignore_index;
  }
  TORCH_CHECK(hard_weight == 0 || label_ptr != nullptr, "fastkd::kd_forward: hard_weight > 0 needs labels");

  const bool batchmean = reduction == "batchmean";
  const double scale = batchmean ? (n_valid > 0 ? 1.0 / double(n_valid) : 0.0) : 1.0;
  const double alpha = hard_weight;
  // The loss is float32, or float64 for float64 input (a float64 gradcheck differentiates it).
  const at::ScalarType loss_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor row_loss = at::empty({n_rows}, student.options().dtype(at::kDouble));
  at::Tensor grad = compute_grad ? new_grad_buffer(student) : at::empty({0}, student.options());
  const size_t grad_bytes = compute_grad ? grad.nbytes() : 0;

  KdArgs a;
  a.student = student.data_ptr();
  a.teacher = teacher.data_ptr();
  a.labels = label_ptr;
  a.grad = compute_grad ? grad.data_ptr() : nullptr;
  a.row_loss = row_loss.data_ptr<double>();
  a.student_dtype = to_dtype(student, "student");
  a.teacher_dtype = to_dtype(teacher, "teacher");
  a.n_rows = n_rows;
  a.vocab = vocab;
  a.ignore_index = ignore_index;
  a.inv_temperature = float(1.0 / temperature);
  a.soft_loss_coef = float((1 - alpha) * (t2_scale ? temperature * temperature : 1.0));
  a.soft_grad_coef = float((1 - alpha) * (t2_scale ? temperature : 1.0 / temperature) * scale);
  a.hard_weight = float(alpha);
  a.hard_grad_coef = float(alpha * scale);
  a.stream_grad = grad_bytes >= kLargeGradBytes;

  void (*rows)(const KdArgs&, int64_t, int64_t, void*) = scalar::kd_rows;
  size_t compute_size = sizeof(float);
  if (a.student_dtype == DType::Float64 || a.teacher_dtype == DType::Float64) {
    rows = scalar::kd_rows_double;
    compute_size = sizeof(double);
  } else {
    switch (selected_isa()) {
      case Isa::Avx512: rows = avx512::kd_rows; break;
      case Isa::Avx2: rows = avx2::kd_rows; break;
      case Isa::Scalar: break;
    }
  }
  // A row of a few thousand entries is already a worthwhile task for a thread.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(vocab, 1));
  // Each task keeps a row's exponentials in its own scratch (2 x (V + one vector) entries).
  const size_t scratch_bytes = 2 * size_t(vocab + 16) * compute_size;
  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
    std::unique_ptr<char[]> scratch(new char[scratch_bytes]);
    rows(a, begin, end, scratch.get());
  });

  if (reduction == "none") return {row_loss.to(loss_dtype), grad};
  // Summed in double, in row order: deterministic whatever the thread count.
  double total = 0;
  for (int64_t i = 0; i < n_rows; ++i) total += a.row_loss[i];
  if (batchmean) total = n_valid > 0 ? total / double(n_valid) : 0.0;
  at::Tensor loss = at::empty({}, student.options().dtype(at::kDouble));
  *loss.data_ptr<double>() = total;
  return {loss.to(loss_dtype), grad};
}

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("kd_forward", &kd_forward_cpu); }

}  // namespace fastkd
