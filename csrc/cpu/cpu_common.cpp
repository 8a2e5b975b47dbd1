// The CPU families' shared driver; see cpu_common.h.
#include "cpu/cpu_common.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/to.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <cstdlib>
#include <mutex>
#include <string>

namespace fastkd {
namespace cpu {
namespace {

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

}  // namespace

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

DType to_dtype(const at::Tensor& x, const char* op, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kBFloat16: return DType::BFloat16;
    case at::kHalf: return DType::Float16;
    case at::kDouble: return DType::Float64;
    default: TORCH_CHECK(false, "fastkd::", op, ": ", name, " must be float32, bfloat16, float16 or float64, got ", x.scalar_type());
  }
}

namespace {

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

}  // namespace

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


GradScale read_grad_scale(const std::optional<at::Tensor>& grad_scale, int64_t n_rows, const char* op) {
  GradScale out;
  if (!grad_scale.has_value()) return out;
  const at::Tensor& s = *grad_scale;
  TORCH_CHECK(s.device().is_cpu() && at::isFloatingType(s.scalar_type()) && (s.numel() == 1 || s.numel() == n_rows),
              "fastkd::", op, ": grad_scale must be a float CPU tensor of 1 or ", n_rows, " (one per row) elements, got ",
              s.scalar_type(), " ", s.sizes(), " on ", s.device());
  if (s.numel() == 1) {
    out.scalar = s.to(at::kDouble).item<double>();
  } else {
    out.rows = s.reshape({n_rows}).to(at::kDouble).contiguous();
  }
  return out;
}

at::Tensor grad_buffer(const at::Tensor& student, const at::Tensor* into, const char* op) {
  if (into == nullptr) return new_grad_buffer(student);
  TORCH_CHECK(into->sizes() == student.sizes() && into->scalar_type() == student.scalar_type() && into->is_contiguous() &&
                  into->device() == student.device(),
              "fastkd::", op, "_rescale_: grad must be the forward's gradient, contiguous ", student.scalar_type(), " ",
              student.sizes(), ", got ", into->scalar_type(), " ", into->sizes());
  return *into;
}

int64_t count_valid_rows(const std::optional<at::Tensor>& labels, int64_t n_rows, int64_t ignore_index, const char* op,
                         const int64_t** label_ptr) {
  *label_ptr = nullptr;
  if (!labels.has_value()) return n_rows;
  const at::Tensor& y = *labels;
  TORCH_CHECK(y.dim() == 1 && y.size(0) == n_rows && y.scalar_type() == at::kLong && y.is_contiguous() && y.device().is_cpu(),
              "fastkd::", op, ": labels must be a contiguous int64 CPU tensor of shape [", n_rows, "]");
  *label_ptr = y.data_ptr<int64_t>();
  int64_t n_valid = 0;
  for (int64_t i = 0; i < n_rows; ++i) n_valid += (*label_ptr)[i] != ignore_index;
  return n_valid;
}

void check_reduction(std::string_view reduction, const char* op) {
  TORCH_CHECK(reduction == "none" || reduction == "sum" || reduction == "batchmean", "fastkd::", op,
              ": reduction must be none, sum or batchmean, got \"", reduction, "\"");
}

double reduction_scale(std::string_view reduction, int64_t n_valid) {
  if (reduction != "batchmean") return 1.0;
  return n_valid > 0 ? 1.0 / double(n_valid) : 0.0;
}

at::Tensor reduce_rows(const at::Tensor& row_loss, std::string_view reduction, int64_t n_valid, at::ScalarType student_dtype) {
  const at::ScalarType loss_dtype = student_dtype == at::kDouble ? at::kDouble : at::kFloat;
  if (reduction == "none") return row_loss.to(loss_dtype);
  const double* rows = row_loss.const_data_ptr<double>();
  double total = 0;
  for (int64_t i = 0; i < row_loss.numel(); ++i) total += rows[i];
  if (reduction == "batchmean") total = n_valid > 0 ? total / double(n_valid) : 0.0;
  at::Tensor loss = at::empty({}, row_loss.options());
  *loss.data_ptr<double>() = total;
  return loss.to(loss_dtype);
}

RowCall begin_row_call(const at::Tensor& student, const std::optional<at::Tensor>& labels, int64_t ignore_index,
                       std::string_view reduction, bool compute_grad, const std::optional<at::Tensor>& grad_scale,
                       at::Tensor* into, const char* op) {
  RowCall c;
  c.n_rows = student.size(0);
  c.vocab = student.size(1);
  c.n_valid = count_valid_rows(labels, c.n_rows, ignore_index, op, &c.labels);
  c.extra = read_grad_scale(grad_scale, c.n_rows, op);
  c.scale = reduction_scale(reduction, c.n_valid) * c.extra.scalar;
  c.row_loss = at::empty({c.n_rows}, student.options().dtype(at::kDouble));
  c.compute_grad = compute_grad;
  c.grad = compute_grad ? grad_buffer(student, into, op) : at::empty({0}, student.options());
  return c;
}

std::tuple<at::Tensor, at::Tensor> RowCall::finish(std::string_view reduction, const at::Tensor& student,
                                                   const at::Tensor* into) const {
  return {reduce_rows(row_loss, reduction, n_valid, student.scalar_type()), into ? at::empty({0}, student.options()) : grad};
}

}  // namespace cpu

std::string cpu_isa() { return cpu::kIsaNames[int(cpu::selected_isa())]; }

int64_t cpu_empty_cache() {
  cpu::GradCache& cache = cpu::grad_cache();
  std::lock_guard<std::mutex> lock(cache.mutex);
  if (!cache.slot.defined()) return 0;
  const int64_t bytes = int64_t(cache.slot.nbytes());
  cache.slot = at::Tensor();  // the memory goes back once its last user lets go
  return bytes;
}

}  // namespace fastkd
