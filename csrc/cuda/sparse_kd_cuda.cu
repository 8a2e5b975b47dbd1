// Fused KD against a sparse teacher (top-k logits or log-probabilities), with optional hard-label
// CE: CUDA.
//
// One thread block per row. The teacher is known at k entries K = {idx_i} of a row of V, values
// v_i; s is the student row, T the temperature, r = max s (0 while still -inf):
//
//   student   x_j = (s_j - r)/T, S = sum_j e^{x_j}, log q_j = x_j - log S        (FULL vocabulary)
//   teacher   tail="renormalize": p_i = softmax(v/T)_i on K, 0 elsewhere
//             tail="uniform" (v: full-vocabulary log-probabilities): the missing mass
//             m = max(0, 1 - sum_K e^{v_i}) spread evenly over the n = V - k other entries,
//             u = log(m / n); p proportional to e^{lp/T} over the full row. With top = max(v, u),
//             log Z = top/T + lz, lz = log(sum_K e^{(v_i - top)/T} + n e^{(u - top)/T}),
//             p_i = e^{(v_i - top)/T - lz}, p_b = e^{(u - top)/T - lz} (each tail entry). An empty
//             tail (k = V, or m = 0) has p_b = 0 and contributes nothing.
//   KL(p||q)  = sum_j p_j ((v_j - top) - (s_j - r)) / T + log S - lz     (v_j = u off K, sum p = 1)
//             = sum_K p_i ((v_i - top) - (s_i - r)) / T
//               + p_b (n (u - top) - sum_{j not in K} (s_j - r)) / T + log S - lz
//             (kd_cuda.cu's form: differences before scaling, log S - lz subtracted last). The
//             tail's student sum needs no membership test: sum_all (s - r) - sum_K (s - r), over
//             finite entries, the -inf ones counted apart (a -inf entry in a tail of positive
//             mass makes the loss +inf).
//   grad      (q_j - p_j) / T over the full row (the teacher is a constant, sum_j p_j = 1):
//             grad = scale * ((1 - a) g (q - p) + a (softmax(s) - onehot(label))), p = p_b off K
//   CE        = logsumexp(s) - s[label]                        (T = 1; only with labels and a > 0)
//   loss      = (1 - a) c KL + a CE,  c = T^2 if t2_scale else 1,  g = T if t2_scale else 1/T
//
// Pass 1 (the student row): per-thread online state in base 2 (online_softmax.cuh's Lse: the
// maximum and S), and for the uniform tail sum (s - r) over finite entries (shifted with the
// reference: sum (s - r') = sum (s - r) + n_finite (r - r')) and the count of -inf entries; the
// states are merged by block_allreduce. Pass 2: the k values, strided over the threads:
// maximum (NaN kept), kept mass, then lz. Pass 3: the kept entries' KL terms (student gathered at
// the indices). Pass 4: the gradient over the row (the tail's value), last chunk first; then,
// after a barrier, each kept entry's own value at its index.
//
// A row whose indices leave [0, V) or repeat (found on the device by sorting each row's indices,
// no host synchronisation) gets a NaN loss and a NaN gradient, as a label outside [0, V) does.
// Ignored rows (label == ignore_index) read nothing: loss 0, gradient 0.
//
// Memory traffic: read N*V (student; pass 4 re-reads it, ideally from L2) + 2*N*k (values,
// indices), write N*V (gradient) + N (row losses).
//
// Accumulation is in float, or in double for a double student (the teacher's values are read
// in that type whatever their storage).

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <iterator>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>
#include <type_traits>

#include "cuda_common.cuh"
#include "gpu_kernel_info.h"
#include "online_softmax.cuh"

namespace fastkd {
namespace {

using namespace cuda_common;
using namespace online_softmax;

// Reads the student row and writes its gradient; reads the label and the broken flag, writes the
// loss (4 bytes: the accumulation type, 8 for a float64 student, is no template argument). The
// k teacher values and k indices, k * (sizeof value + sizeof index) bytes, come on top: k is a
// run-time size, not V.
FASTKD_GPU_KERNEL_INFO(sparse_kd_forward_kernel, "V*2*$0+8+1+4", FASTKD_ROW_THREADS);

__device__ __forceinline__ float log_(float x) { return logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }

// The teacher's storage, read by a switch per entry (k entries per row: not worth a template).
enum ValuesDtype : int { kValF32 = 0, kValBF16 = 1, kValF16 = 2, kValF64 = 3 };

template <typename acc_t>
__device__ __forceinline__ acc_t load_value(const void* values, int dtype, int64_t i) {
  switch (dtype) {
    case kValF32: return static_cast<acc_t>(static_cast<const float*>(values)[i]);
    case kValBF16: return static_cast<acc_t>(static_cast<float>(static_cast<const at::BFloat16*>(values)[i]));
    case kValF16: return static_cast<acc_t>(static_cast<float>(static_cast<const at::Half*>(values)[i]));
    default: return static_cast<acc_t>(static_cast<const double*>(values)[i]);
  }
}

__device__ __forceinline__ int64_t load_index(const void* indices, bool int32, int64_t i) {
  return int32 ? static_cast<int64_t>(static_cast<const int32_t*>(indices)[i]) : static_cast<const int64_t*>(indices)[i];
}

template <typename acc_t>
struct SparseParams : KdCoefs<acc_t> {
  int64_t k;
  acc_t inv_t;             // 1 / T
  const void* values;      // [N, k]
  int values_dtype;        // ValuesDtype
  const void* indices;     // [N, k] int64, or int32 when indices_int32
  bool indices_int32;
  const int8_t* broken;    // [N]: 1 where the row's indices leave [0, V) or repeat
  bool uniform;            // tail="uniform"
};

// Online statistics of (part of) the student row; see the comment at the top.
template <typename acc_t>
struct RowState {
  StudentLse<acc_t> s;  // maximum, sum 2^{(s - r) x_scale} and (CE when T != 1) sum e^{s - r}
  acc_t d;              // sum over finite entries of (s - r)           (uniform tail)
  acc_t n_fin;          // number of finite (or NaN) entries           (uniform tail)
  int n_ninf;           // number of -inf entries                       (uniform tail)

  __device__ __forceinline__ static RowState empty() { return {StudentLse<acc_t>::empty(), acc_t(0), acc_t(0), 0}; }

  __device__ __forceinline__ void merge(const RowState& b, acc_t x_scale, bool sep_ce) {
    const acc_t r = ref_of(max_(s.lse.m, b.s.lse.m));
    d = (d + n_fin * (ref_of(s.lse.m) - r)) + (b.d + b.n_fin * (ref_of(b.s.lse.m) - r));
    n_fin += b.n_fin;
    n_ninf += b.n_ninf;
    s.merge(b.s, x_scale, sep_ce);
  }
};

// Sums (or, with IS_MAX, takes the NaN-ignoring maximum of) N values over the block; every thread
// gets the results. smem: at least (kMaxWarps + 1) * N entries.
template <bool IS_MAX, int N, typename acc_t>
__device__ __forceinline__ void block_reduce(acc_t (&x)[N], acc_t* smem) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    for (int mask = 16; mask > 0; mask >>= 1) {
      const acc_t o = __shfl_xor_sync(0xffffffffu, x[i], mask);
      x[i] = IS_MAX ? max_(x[i], o) : x[i] + o;
    }
  }
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int n_warps = static_cast<int>(blockDim.x / 32);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) smem[warp * N + i] = x[i];
  }
  __syncthreads();
  if (threadIdx.x < N) {
    acc_t t = smem[threadIdx.x];
    for (int w = 1; w < n_warps; ++w) {
      const acc_t o = smem[w * N + threadIdx.x];
      t = IS_MAX ? max_(t, o) : t + o;
    }
    smem[kRowMaxWarps * N + threadIdx.x] = t;
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) x[i] = smem[kRowMaxWarps * N + i];
  __syncthreads();
}

// At least one block of kMaxThreads per SM, said explicitly: with the default, ptxas held the
// sm_90 float64 scalar-load kernel to 64 registers and spilled.
template <typename S, int VEC>
__global__ void __launch_bounds__(kRowMaxThreads, 1) sparse_kd_forward_kernel(const S* __restrict__ student,
                                                                        const int64_t* __restrict__ labels,
                                                                        acc_type_t<S>* __restrict__ row_loss,
                                                                        S* __restrict__ grad,
                                                                        const SparseParams<acc_type_t<S>> p) {
  using acc_t = acc_type_t<S>;
  __shared__ RowState<acc_t> smem_state[kRowMaxWarps + 1];
  __shared__ acc_t smem[(kRowMaxWarps + 1) * 3];
  const int64_t row = blockIdx.x;
  if (p.scale.gs.skip(row)) return;  // the forward's gradient stands: no traffic (uniform per block)
  const int64_t vocab = p.vocab;
  const int64_t k = p.k;
  const S* s_row = student + row * vocab;
  S* g_row = grad == nullptr ? nullptr : grad + row * vocab;
  const int64_t kbase = row * k;

  // The label and the broken flag are the same for the whole block: these branches are uniform.
  int64_t label = -1;
  bool ignored = false;
  bool bad = p.broken[row] != 0;
  if (labels != nullptr) {
    label = labels[row];
    ignored = label == p.ignore_index;
    bad = !ignored && (bad || label < 0 || label >= vocab);
  }
  if (ignored || bad) {
    write_skipped_row<VEC>(bad, row_loss, row, g_row, vocab);
    return;
  }

  const acc_t xs = p.x_scale;
  const acc_t inv_t = p.inv_t;
  const bool sep_ce = p.has_ce && !p.same_t;
  constexpr int kE = kRowElems<VEC>;
  const Chunks<VEC> chunks(vocab);

  // Pass 1: the student row, every sum in one loop (a second loop would hold the chunk longer).
  const acc_t log2e = Consts<acc_t>::kLog2e;
  RowState<acc_t> st = RowState<acc_t>::empty();
  for (int64_t c = 0; c < chunks.count; ++c) {
    acc_t sv[kE];
    load_chunk<VEC>(s_row, vocab, c * chunks.size, sv);
    Lse<acc_t>& lse = st.s.lse;
    const acc_t m = max_(lse.m, chunk_max(sv));
    const acc_t r = ref_of(m);
    lse.sum *= exp2_((lse.m - r) * xs);
    if (sep_ce) st.s.sum_1 *= exp2_((lse.m - r) * log2e);
    if (p.uniform) st.d += st.n_fin * (ref_of(lse.m) - r);
#pragma unroll
    for (int u = 0; u < kE / VEC; ++u) {
      const bool in_row = slot_index<VEC>(c * chunks.size, u) < vocab;  // a vector is all in or all out
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const acc_t x = sv[u * VEC + e];
        lse.sum += exp2_((x - r) * xs);
        if (sep_ce) st.s.sum_1 += exp2_((x - r) * log2e);
        if (p.uniform && in_row) {
          if (x == neg_inf<acc_t>()) {
            st.n_ninf += 1;
          } else {
            st.d += x - r;
            st.n_fin += acc_t(1);
          }
        }
      }
    }
    lse.m = m;
  }
  const RowState<acc_t> tot = block_allreduce<kRowMaxWarps>(
      st, RowState<acc_t>::empty(), [&](RowState<acc_t>& a, const RowState<acc_t>& b) { a.merge(b, xs, sep_ce); },
      smem_state);
  const acc_t r_s = ref_of(tot.s.lse.m);
  const acc_t sum_1 = p.same_t ? tot.s.lse.sum : tot.s.sum_1;

  // Pass 2: the teacher's maximum (NaN kept), kept mass, the uniform tail, lz.
  acc_t mx[2] = {neg_inf<acc_t>(), acc_t(0)};  // max of v, NaN flag
  acc_t sums[3] = {acc_t(0), acc_t(0), acc_t(0)};
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    const acc_t v = load_value<acc_t>(p.values, p.values_dtype, kbase + i);
    if (v != v) mx[1] = acc_t(1);
    else mx[0] = max_(mx[0], v);
    if (p.uniform) sums[0] += exp_(v);
  }
  block_reduce<true>(mx, smem);
  if (p.uniform) block_reduce<false>(sums, smem);
  const acc_t mv = mx[1] != acc_t(0) ? quiet_nan<acc_t>() : mx[0];
  const acc_t n_rest = static_cast<acc_t>(vocab - k);
  acc_t tail_mass = acc_t(1) - sums[0];  // NaN stays NaN
  if (tail_mass < acc_t(0)) tail_mass = acc_t(0);  // a kept mass of 1 up to rounding: no tail
  const bool has_tail = p.uniform && vocab > k && tail_mass != acc_t(0);
  const acc_t ub = has_tail ? log_(tail_mass / n_rest) : neg_inf<acc_t>();
  const acc_t top = has_tail && !(ub <= mv) ? ub : mv;
  sums[0] = acc_t(0);
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    sums[0] += exp_((load_value<acc_t>(p.values, p.values_dtype, kbase + i) - top) * inv_t);
  }
  block_reduce<false>(sums, smem);
  const acc_t lz = log_(sums[0] + (has_tail ? n_rest * exp_((ub - top) * inv_t) : acc_t(0)));
  const acc_t pb = has_tail ? exp_((ub - top) * inv_t - lz) : acc_t(0);

  // Pass 3: the kept entries' KL terms; sum (s - r) over them for the tail.
  sums[0] = sums[1] = sums[2] = acc_t(0);  // kept terms, sum (s - r) finite, -inf count
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    const acc_t v = load_value<acc_t>(p.values, p.values_dtype, kbase + i);
    const int64_t j = load_index(p.indices, p.indices_int32, kbase + i);
    const acc_t pv = exp_((v - top) * inv_t - lz);
    const acc_t dj = load_as<acc_t>(s_row + j) - r_s;
    if (pv != acc_t(0)) sums[0] += pv * (((v - top) - dj) * inv_t);  // NaN fails == 0: kept
    if (p.uniform) {
      if (dj == neg_inf<acc_t>()) sums[2] += acc_t(1);
      else sums[1] += dj;
    }
  }
  block_reduce<false>(sums, smem);

  if (threadIdx.x == 0) {
    acc_t kept = sums[0];
    if (has_tail && pb != acc_t(0)) {
      // sum over the tail of ((u - top) - (s_j - r)); +inf when a tail entry is -inf
      const bool tail_ninf = static_cast<acc_t>(tot.n_ninf) > sums[2];
      const acc_t tail_diff = tail_ninf ? static_cast<acc_t>(INFINITY) : n_rest * (ub - top) - (tot.d - sums[1]);
      kept += pb * (tail_diff * inv_t);
    }
    acc_t kl = (kept + Consts<acc_t>::kLn2 * log2_(tot.s.lse.sum)) - lz;
    kl = kl < acc_t(0) ? acc_t(0) : kl;  // KL >= 0; rounding can leave a hair below 0 (NaN kept)
    row_loss[row] = p.row_loss(kl, sum_1, r_s, s_row, label);
  }
  if (g_row == nullptr) return;

  // Pass 4: the gradient: the tail's value over the row, last chunk first; then the kept entries.
  const auto [k_soft, k_hard] = p.grad_coefs(row);
  const acc_t inv_s = acc_t(1) / tot.s.lse.sum;
  const acc_t inv_1 = acc_t(1) / sum_1;
  auto value = [&](acc_t s, acc_t p_j, int64_t j) {
    const acc_t q = exp2_((s - r_s) * xs) * inv_s;
    acc_t g = k_soft * (q - p_j);
    if (p.has_ce) g += ce_grad(k_hard, s, q, j == label, p.same_t, r_s, inv_1);
    return g;
  };
  acc_t sv[kE];
  write_grad_row<VEC>(
      g_row, vocab, chunks, [&](int64_t base) { load_chunk<VEC>(s_row, vocab, base, sv); },
      [&](int e, int64_t j) { return value(sv[e], pb, j); });
  // Every thread's stores above are visible to, and ordered before, the block's stores below.
  __syncthreads();
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    const acc_t v = load_value<acc_t>(p.values, p.values_dtype, kbase + i);
    const int64_t j = load_index(p.indices, p.indices_int32, kbase + i);
    g_row[j] = store_as<S>(value(load_as<acc_t>(s_row + j), exp_((v - top) * inv_t - lz), j));
  }
}

int values_code(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return kValF32;
    case at::kBFloat16: return kValBF16;
    case at::kHalf: return kValF16;
    case at::kDouble: return kValF64;
    default: TORCH_CHECK(false, "fastkd::sparse_kd_forward (cuda): values must be float32, float16, bfloat16 or float64, got ", st);
  }
}

// The forward, or (into given) the rescale op's recomputation into the forward's gradient.
std::tuple<at::Tensor, at::Tensor> sparse_kd_impl(const at::Tensor& student, const at::Tensor& values, const at::Tensor& indices,
                                                  const std::optional<at::Tensor>& labels_opt, std::string_view values_kind,
                                                  std::string_view tail, double temperature, double hard_weight,
                                                  int64_t ignore_index, std::string_view reduction, bool t2_scale,
                                                  bool compute_grad, const std::optional<at::Tensor>& grad_scale,
                                                  at::Tensor* into) {
  constexpr const char* kOp = "fastkd::sparse_kd_forward (cuda): ";
  TORCH_CHECK(values_kind == "logits" || values_kind == "logprobs", kOp, "values must be 'logits' or 'logprobs', got '",
              std::string(values_kind), "'");
  TORCH_CHECK(tail == "renormalize" || tail == "uniform", kOp, "tail must be 'renormalize' or 'uniform', got '", std::string(tail), "'");
  TORCH_CHECK(tail != "uniform" || values_kind == "logprobs", kOp, "tail='uniform' needs values='logprobs'");
  check_row_reduction(reduction, kOp);
  TORCH_CHECK(student.is_cuda(), kOp, "student must be a CUDA tensor, got device ", student.device());
  TORCH_CHECK(values.device() == student.device() && indices.device() == student.device(), kOp,
              "values and indices must be on the student's device ", student.device());
  TORCH_CHECK(student.dim() == 2 && student.is_contiguous(), kOp, "student must be contiguous [N, V], got shape ", student.sizes());
  TORCH_CHECK(values.dim() == 2 && values.size(0) == student.size(0) && values.is_contiguous(), kOp,
              "values must be contiguous [N, k] with N = ", student.size(0), ", got ", values.sizes());
  TORCH_CHECK(indices.sizes() == values.sizes() && indices.is_contiguous(), kOp, "indices must be contiguous and shaped like values ",
              values.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt, kOp, "indices must be int64 or int32, got ",
              indices.scalar_type());
  TORCH_CHECK(values.size(1) >= 1, kOp, "the teacher needs k >= 1 entries per row");
  TORCH_CHECK(is_float_dtype(student.scalar_type()), kOp, "student must be float32, float16, bfloat16 or float64, got ",
              student.scalar_type());
  TORCH_CHECK(temperature > 0, kOp, "temperature must be > 0, got ", temperature);
  TORCH_CHECK(hard_weight >= 0 && hard_weight <= 1, kOp, "hard_weight must be in [0, 1], got ", hard_weight);
  const int64_t n_rows = student.size(0);
  const int64_t vocab = student.size(1);
  const int64_t k = values.size(1);
  TORCH_CHECK(n_rows <= std::numeric_limits<int32_t>::max(), kOp, "at most 2^31 - 1 rows, got ", n_rows);
  const at::Tensor* labels = checked_labels(labels_opt, n_rows, student.device(), kOp);
  TORCH_CHECK(hard_weight == 0 || labels != nullptr, kOp, "hard_weight > 0 needs labels");

  const c10::cuda::CUDAGuard guard(student.device());
  const bool acc_double = student.scalar_type() == at::kDouble;
  const at::ScalarType acc_dtype = acc_double ? at::kDouble : at::kFloat;
  RowOutputs out(student, acc_dtype, labels, ignore_index, reduction, compute_grad, grad_scale, into, kOp);

  // Rows whose indices leave [0, V) or repeat, found on the device (a sort per row): the kernel
  // gives them a NaN loss and gradient. No host synchronisation.
  at::Tensor broken = indices.lt(0).logical_or_(indices.ge(vocab)).any(-1);
  if (k > 1) {
    const at::Tensor ordered = std::get<0>(indices.sort(-1));
    broken.logical_or_(ordered.slice(1, 1).eq(ordered.slice(1, 0, k - 1)).any(-1));
  }
  broken = broken.to(at::kChar).contiguous();

  if (n_rows > 0) {
    dispatch_dtype(student.scalar_type(), kOp, [&](auto s_tag) {
      using S = typename decltype(s_tag)::type;
      using acc_t = acc_type_t<S>;
      SparseParams<acc_t> p;
      static_cast<KdCoefs<acc_t>&>(p) = kd_coefs<acc_t>(vocab, ignore_index, temperature, hard_weight, t2_scale, 1.0,
                                                         labels != nullptr, out.row_scale<acc_t>(into != nullptr));
      p.k = k;
      p.inv_t = static_cast<acc_t>(1.0 / temperature);
      p.values = values.const_data_ptr();
      p.values_dtype = values_code(values.scalar_type());
      p.indices = indices.const_data_ptr();
      p.indices_int32 = indices.scalar_type() == at::kInt;
      p.broken = broken.const_data_ptr<int8_t>();
      p.uniform = tail == "uniform";
      const S* s = student.const_data_ptr<S>();
      S* g = compute_grad ? out.grad.mutable_data_ptr<S>() : nullptr;
      acc_t* loss = out.row_loss.mutable_data_ptr<acc_t>();
      const int64_t* l = labels != nullptr ? labels->const_data_ptr<int64_t>() : nullptr;
      // Vector loads need every row to start on a vector boundary in the student and the gradient.
      launch_rows<4>(n_rows, vocab, {{s, sizeof(S)}, {g, sizeof(S)}}, [&](auto vec, dim3 grid, int threads, cudaStream_t stream) {
        sparse_kd_forward_kernel<S, decltype(vec)::value><<<grid, threads, 0, stream>>>(s, l, loss, g, p);
      });
    });
  }
  return {out.loss(acc_double ? at::kDouble : at::kFloat), into != nullptr ? at::empty({0}, student.options()) : out.grad};
}

std::tuple<at::Tensor, at::Tensor> sparse_kd_forward_cuda(const at::Tensor& student, const at::Tensor& values,
                                                          const at::Tensor& indices, const std::optional<at::Tensor>& labels,
                                                          std::string_view values_kind, std::string_view tail,
                                                          double temperature, double hard_weight, int64_t ignore_index,
                                                          std::string_view reduction, bool t2_scale, bool compute_grad,
                                                          const std::optional<at::Tensor>& grad_scale) {
  return sparse_kd_impl(student, values, indices, labels, values_kind, tail, temperature, hard_weight, ignore_index, reduction,
                        t2_scale, compute_grad, grad_scale, nullptr);
}

// The gradient into `grad` again, times grad_scale (csrc/ops.cpp): blocks whose scale is 1 return.
void sparse_kd_forward_rescale_cuda(at::Tensor& grad, const at::Tensor& student, const at::Tensor& values,
                                    const at::Tensor& indices, const std::optional<at::Tensor>& labels,
                                    std::string_view values_kind, std::string_view tail, double temperature,
                                    double hard_weight, int64_t ignore_index, std::string_view reduction, bool t2_scale,
                                    const at::Tensor& grad_scale) {
  sparse_kd_impl(student, values, indices, labels, values_kind, tail, temperature, hard_weight, ignore_index, reduction,
                 t2_scale, true, grad_scale, &grad);
}

}  // namespace
}  // namespace fastkd

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("sparse_kd_forward", &fastkd::sparse_kd_forward_cuda);
  m.impl("sparse_kd_forward_rescale_", &fastkd::sparse_kd_forward_rescale_cuda);
}
