// CPU implementation of the relational ops (fastkd/ops/relational.py): fastkd::rkd_distance_forward,
// rkd_angle_forward, sp_forward, pkt_forward.
//
// Each is GEMM, fused B² (or B³) passes, GEMM:
//   1. G = E·Eᵀ for student and teacher (at::mm: the BLAS; the Gram of the centred embeddings for
//      the RKD losses, which are translation invariant);
//   2. the loss, and a B×B matrix M with dL/dE = M·E (M = dL/dG + dL/dGᵀ), in a few passes over
//      rows of the B×B matrices (threads over rows, sums in double);
//   3. dE = M·E (at::mm), in the compute type, cast to the student's dtype.
// Compute type: float32 for float32/bfloat16/float16 students, float64 for float64.
//
// Squared distances for the RKD losses: d²_ij = G_ii + G_jj − 2 G_ij on centred rows. Where that
// is within the GEMM's worst-case rounding error of zero (d² < 8 (D + 2) u (G_ii + G_jj), u the
// GEMM type's unit roundoff) the pair is recomputed exactly from the input rows, in double: an
// exact duplicate then has d² = 0 exactly, which the F.normalize and clamp kinks of the
// references need (a Gram d² is rounding noise there). So is every close pair (d² < (G_ii +
// G_jj) / 16), whose Gram d² has lost more than a few digits (see "Close pairs" below). RKD angle builds its Gram in float64 (its
// cosines are differences of distances, and float32 would cost them ~3 digits); RKD distance,
// SP and PKT in the compute type.
//
// The RKD-angle triplet loop is relational_kernel.h (per instruction set); the B² passes are here.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu/cpu_common.h"

FASTKD_PER_ISA(int64_t rkd_angle_block_rows())
FASTKD_PER_ISA(size_t rkd_angle_scratch_bytes(int64_t n, size_t elem_size))
FASTKD_PER_ISA(void rkd_angle_blocks_f32(const float* hs, const float* ht, int64_t n, float* pu, float* rowsum,
                                          double* loss, int64_t block_begin, int64_t block_end, void* scratch,
                                          const uint8_t* skip))
FASTKD_PER_ISA(void rkd_angle_blocks_f64(const double* hs, const double* ht, int64_t n, double* pu, double* rowsum,
                                          double* loss, int64_t block_begin, int64_t block_end, void* scratch,
                                          const uint8_t* skip))

namespace fastkd {
namespace {

constexpr double kPdistEps = 1e-12;  // torchdistill's clamp of squared distances (RKD distance)
constexpr double kNormEps = 1e-12;   // F.normalize's eps (RKD angle, SP)
// A pair is close when d² < (G_ii + G_jj) / kCloseRatio² (centred rows): the Gram identity has lost
// more than ~kCloseRatio² of its digits there, and its d² is recomputed from the rows.
constexpr double kCloseRatio = 4.0;

// Threads over rows of a B×B matrix, at least 64k entries per task: below that a pass takes
// microseconds, less than a parallel region's barrier costs when a thread has been descheduled.
template <class F>
void for_rows(int64_t n, const F& f) {
  at::parallel_for(0, n, std::max<int64_t>(1, 65536 / std::max<int64_t>(n, 1)), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) f(i);
  });
}

void check_pair(const at::Tensor& student, const at::Tensor& teacher, const char* op, int64_t min_batch) {
  TORCH_CHECK(student.dim() == 2 && student.is_contiguous(), "fastkd::", op, ": student must be contiguous [B, D], got shape ",
              student.sizes());
  TORCH_CHECK(teacher.dim() == 2 && teacher.is_contiguous(), "fastkd::", op, ": teacher must be contiguous [B, Dt], got shape ",
              teacher.sizes());
  TORCH_CHECK(teacher.size(0) == student.size(0), "fastkd::", op, ": teacher has ", teacher.size(0), " rows but student has ",
              student.size(0));
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu(), "fastkd::", op, " (cpu): tensors must be on the CPU");
  TORCH_CHECK(student.size(0) >= min_batch, "fastkd::", op, ": needs a batch of at least ", min_batch, ", got ", student.size(0));
  TORCH_CHECK(student.size(1) > 0 && teacher.size(1) > 0, "fastkd::", op, ": embeddings must have at least one feature");
  cpu::to_dtype(student, op, "student");
  cpu::to_dtype(teacher, op, "teacher");
}

at::ScalarType compute_type(const at::Tensor& student) { return student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// x − (mean of the rows), in `type`: the mean in double, each entry rounded once. Also the
// squared norms of the centred rows (in double) when `sq_norms` is given.
at::Tensor centred(const at::Tensor& x, at::ScalarType type, std::vector<double>* sq_norms = nullptr) {
  const int64_t n = x.size(0), d = x.size(1);
  at::Tensor out = at::empty({n, d}, x.options().dtype(type));
  if (sq_norms) sq_norms->assign(n, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "centred", [&] {
    using X = scalar_t;
    const X* xp = x.const_data_ptr<X>();
    std::vector<double> mean(d, 0.0);
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t k = 0; k < d; ++k) mean[k] += double(xp[i * d + k]);
    }
    for (int64_t k = 0; k < d; ++k) mean[k] /= double(n);
    AT_DISPATCH_FLOATING_TYPES(type, "centred_out", [&] {
      scalar_t* op = out.data_ptr<scalar_t>();
      at::parallel_for(0, n, std::max<int64_t>(1, 65536 / std::max<int64_t>(d, 1)), [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          for (int64_t k = 0; k < d; ++k) op[i * d + k] = scalar_t(double(xp[i * d + k]) - mean[k]);
          if (sq_norms) {
            double sq = 0;
            for (int64_t k = 0; k < d; ++k) sq += double(op[i * d + k]) * double(op[i * d + k]);
            (*sq_norms)[i] = sq;
          }
        }
      });
    });
  });
  return out;
}

// Exact squared distance of two input rows, in double (differences of float inputs are exact).
template <class X>
double row_sq_dist(const X* a, const X* b, int64_t d) {
  double acc = 0;
  for (int64_t k = 0; k < d; ++k) {
    const double diff = double(a[k]) - double(b[k]);
    acc += diff * diff;
  }
  return acc;
}

// Squared distances of rows [i0, i1) to every later row, from a block of a Gram matrix
// (gram[(i - i0) * ld + (j - i0)] = G_ij for j >= i) and its diagonal g; writes scale · d² to out
// at (i, j) and (j, i), 0 at (i, i). Pairs within the GEMM's rounding error of zero are recomputed
// from the input rows x ([n, d], any float dtype). `gram` may alias `out` (in place) when the
// block is the whole matrix: only the upper triangle is read, and only after its slot is written.
// With `close` > 0, pairs with d² < close (G_ii + G_jj) are recomputed as well.
template <class G, class O>
void pair_sq_dist(const G* gram, int64_t ld, const double* g, int64_t i0, int64_t i1, int64_t n, const at::Tensor& x,
                  double gemm_unit_roundoff, double scale, O* out, double close = 0) {
  const int64_t d = x.size(1);
  const double tau = std::max(8.0 * double(d + 2) * gemm_unit_roundoff, close);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pair_sq_dist", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    at::parallel_for(i0, i1, std::max<int64_t>(1, 65536 / std::max<int64_t>(n, 1)), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const G* row = gram + (i - i0) * ld - i0;
        out[i * n + i] = O(0);
        for (int64_t j = i + 1; j < n; ++j) {
          double d2 = g[i] + g[j] - 2.0 * double(row[j]);
          if (!(d2 >= tau * (g[i] + g[j]))) d2 = row_sq_dist(xp + i * d, xp + j * d, d);
          const O v = O(scale * std::max(d2, 0.0));
          out[i * n + j] = v;
          out[j * n + i] = v;
        }
      }
    });
  });
}

// G = x·xᵀ, computed where it is needed only: row blocks [i0, i0 + b) against rows [i0, n), one
// BLAS call each (about 3/4 of a full GEMM's flops for two blocks, 17/32 for sixteen). The
// strictly lower triangle is left unwritten unless `mirror`.
at::Tensor gram_upper(const at::Tensor& x, bool mirror) {
  const int64_t n = x.size(0);
  at::Tensor g = at::empty({n, n}, x.options());
  const int64_t block = n <= 64 ? n : std::max<int64_t>(64, std::min<int64_t>(128, (n + 1) / 2));
  for (int64_t i0 = 0; i0 < n; i0 += block) {
    const int64_t ib = std::min(block, n - i0);
    at::Tensor out = g.narrow(0, i0, ib).narrow(1, i0, n - i0);
    at::mm_out(out, x.narrow(0, i0, ib), x.narrow(0, i0, n - i0).t());
  }
  if (mirror) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gram_mirror", [&] {
      scalar_t* p = g.data_ptr<scalar_t>();
      for_rows(n, [&](int64_t i) {
        for (int64_t j = 0; j < i; ++j) p[i * n + j] = p[j * n + i];
      });
    });
  }
  return g;
}

// Squared distances of the rows of x (any float dtype), scaled, in a [n, n] tensor of `type`, from
// a `type` Gram matrix of the centred rows (in place). Returns the centred rows (in `type`), and
// the Gram's diagonal in `g` when given; `close` as pair_sq_dist's.
at::Tensor sq_dists_same_type(const at::Tensor& x, at::ScalarType type, double scale, at::Tensor* out, double close = 0,
                              std::vector<double>* g_out = nullptr) {
  at::Tensor xc = centred(x, type);
  at::Tensor gram = gram_upper(xc, /*mirror=*/false);
  const int64_t n = x.size(0);
  std::vector<double> g(n);
  const double u = type == at::kDouble ? 0x1p-53 : 0x1p-24;
  AT_DISPATCH_FLOATING_TYPES(type, "sq_dists", [&] {
    scalar_t* p = gram.data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) g[i] = double(p[i * n + i]);
    pair_sq_dist<scalar_t, scalar_t>(p, n, g.data(), 0, n, n, x, u, scale, p, close);
  });
  *out = gram;
  if (g_out) *g_out = std::move(g);
  return xc;
}

// As sq_dists_same_type, from a float64 Gram matrix built in row blocks (so the float64 matrix
// never exists whole), close pairs recomputed (RKD angle's thin vertices run in double, and a
// near-duplicate's d² from a float64 Gram keeps only ~16 − 2 log10(spread / distance) digits);
// returns the centred rows in `type`.
at::Tensor sq_dists_via_double(const at::Tensor& x, at::ScalarType type, double scale, at::Tensor* out) {
  const int64_t n = x.size(0);
  std::vector<double> g;
  at::Tensor xc = centred(x, at::kDouble, &g);
  *out = at::empty({n, n}, x.options().dtype(type));
  const int64_t rows = std::max<int64_t>(64, (int64_t(1) << 18) / std::max<int64_t>(n, 1));  // ~2 MB blocks
  for (int64_t i0 = 0; i0 < n; i0 += rows) {
    const int64_t ib = std::min(rows, n - i0);
    at::Tensor block = at::mm(xc.narrow(0, i0, ib), xc.narrow(0, i0, n - i0).t());
    AT_DISPATCH_FLOATING_TYPES(type, "sq_dists", [&] {
      pair_sq_dist<double, scalar_t>(block.const_data_ptr<double>(), n - i0, g.data(), i0, i0 + ib, n, x,
                                      0x1p-53, scale, out->data_ptr<scalar_t>(), 1.0 / (kCloseRatio * kCloseRatio));
    });
  }
  return xc.to(type);
}

double huber(double x) {
  const double a = std::abs(x);
  return a < 1 ? 0.5 * x * x : a - 0.5;
}

template <class C>
C clamp1(C x) {
  return x < C(-1) ? C(-1) : (x > C(1) ? C(1) : x);  // NaN stays NaN
}

at::Tensor scalar_loss(double value, const at::Tensor& student) {
  at::Tensor loss = at::empty({}, student.options().dtype(compute_type(student)));
  AT_DISPATCH_FLOATING_TYPES(loss.scalar_type(), "loss", [&] { *loss.data_ptr<scalar_t>() = scalar_t(value); });
  return loss;
}

double sum_in_order(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return s;
}

at::Tensor finish_grad(const at::Tensor& m, const at::Tensor& rows, const at::Tensor& student) {
  return at::mm(m, rows).to(student.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// RKD distance. With d_ij = sqrt(max(d²_ij, 1e-12)) (i != j), μ = mean of the B(B-1) off-diagonal
// d, ψ = d / μ, H = clamp(ψ_s − ψ_t, ±1) / B², c = Σ_{i≠j} H ψ_s / (B(B-1)):
//   L = Σ_ij huber(ψ_s − ψ_t) / B²,   Z_ij = ∂L/∂d²_ij = (H_ij − c) [d²_ij ≥ 1e-12] / (2 μ_s d_ij),
//   dE = 4 (diag(Z·1) − Z) E.
// Three passes over rows, each square root and division taken once:
//   1. d² -> v = d (or −1e-6 where the clamp applies: its gradient is 0), 0 on the diagonal; row
//      sums of |v|;
//   2. the loss, Σ H ψ_s, and (with the gradient) a = H k / d and b = k / d where the clamp does
//      not apply (k = 4 / B² / (2 μ_s)), written over v_s and v_t;
//   3. Z k-scaled: z = a − c b; M's row: −z off the diagonal, Σ z on it.
//
// Close pairs. On centred rows the Gram identity d² = G_ii + G_jj − 2 G_ij is off by ~u (G_ii +
// G_jj), and the GEMM forms pair (i, j)'s gradient z_ij (e_i − e_j) from z_ij e_i and z_ij e_j,
// off by u |z_ij| (|e_i| + |e_j|): both are ~(|e_i| + |e_j|)² / d²_ij or its root times the
// rounding of the pair's own terms, which is what a float32 composite loses on near-coincident
// pairs (and with every pair of a 1-D batch near the centroid). A pair is close when d² < (G_ii +
// G_jj) / kCloseRatio²: its d² is recomputed from the input rows (exact in double), and its term
// leaves M and is added as z_ij (x_i − x_j) from the input rows, O(D) per close pair. The other
// pairs lose at most ~kCloseRatio² (distance) and ~2 kCloseRatio (gradient) times their rounding.
// A random batch in a few dimensions or more has no close pair and runs as before.
// ---------------------------------------------------------------------------------------------


// close[i]: the close partners j of row i (pass 3 leaves them out of M and appends (j, z_ij) to
// close_z[i] for those with j > i).
using ClosePairs = std::vector<std::vector<int64_t>>;
using CloseTerms = std::vector<std::vector<std::pair<int64_t, double>>>;

template <class C>
double rkd_distance_passes(C* ds, C* dt, int64_t n, bool grad, const ClosePairs& close, CloseTerms* close_z) {
  const double pairs = double(n) * double(n - 1);
  const C floor_d = std::sqrt(C(kPdistEps));
  std::vector<double> row_s(n), row_t(n), row_loss(n), row_c(n);
  for_rows(n, [&](int64_t i) {
    C* vs = ds + i * n;
    C* vt = dt + i * n;
    double as = 0, at_ = 0;
    for (int64_t j = 0; j < n; ++j) {
      const C s2 = vs[j], t2 = vt[j];
      const C a = j == i ? C(0) : (s2 >= C(kPdistEps) ? std::sqrt(s2) : (s2 != s2 ? s2 : -floor_d));  // NaN kept
      const C b = j == i ? C(0) : (t2 >= C(kPdistEps) ? std::sqrt(t2) : (t2 != t2 ? t2 : -floor_d));
      vs[j] = a;
      vt[j] = b;
      as += double(std::abs(a));
      at_ += double(std::abs(b));
    }
    row_s[i] = as, row_t[i] = at_;
  });
  const double mu_s = sum_in_order(row_s) / pairs, mu_t = sum_in_order(row_t) / pairs;
  // ψ = d / μ by division, as the reference: with B = 2 it is then exactly 1.
  const C cmu_s = C(mu_s), cmu_t = C(mu_t);
  const C k = C(4.0 / (double(n) * double(n)) / (2.0 * mu_s));
  for_rows(n, [&](int64_t i) {
    C* vs = ds + i * n;
    C* vt = dt + i * n;
    double l = 0, c = 0;
    for (int64_t j = 0; j < n; ++j) {
      const C ps = std::abs(vs[j]) / cmu_s, pt = std::abs(vt[j]) / cmu_t;
      const C diff = ps - pt;
      const C h = clamp1(diff);
      l += huber(double(diff));
      c += double(h) * double(ps);
      if (grad) {
        const C kd = vs[j] > C(0) ? k / vs[j] : C(0);  // 0 on the diagonal and under the clamp
        vs[j] = h * kd;
        vt[j] = kd;
      }
    }
    row_loss[i] = l, row_c[i] = c;
  });
  if (grad) {
    const C c = C(sum_in_order(row_c) / pairs);
    for_rows(n, [&](int64_t i) {
      C* m = ds + i * n;
      const C* b = dt + i * n;
      double diag = 0;
      for (int64_t j = 0; j < n; ++j) {
        const C z = m[j] - c * b[j];
        m[j] = -z;
        diag += double(z);
      }
      // Close pairs leave M (the diagonal loses them in double, before its one rounding).
      for (int64_t j : close[i]) {
        if (j > i) (*close_z)[i].emplace_back(j, double(-m[j]));
        diag += double(m[j]);
        m[j] = C(0);
      }
      m[i] = C(diag);  // z_ii = 0: a and b are 0 on the diagonal
    });
  }
  return sum_in_order(row_loss) / (double(n) * double(n));
}

// The close partners of every row (see "Close pairs" above), from squared distances d2 and the
// Gram's diagonal g.
template <class C>
ClosePairs close_pairs(const C* d2, const std::vector<double>& g, int64_t n) {
  ClosePairs close(n);
  const double k = 1.0 / (kCloseRatio * kCloseRatio);
  for_rows(n, [&](int64_t i) {
    for (int64_t j = 0; j < n; ++j) {
      if (j != i && double(d2[i * n + j]) < k * (g[i] + g[j])) close[i].push_back(j);
    }
  });
  return close;
}

std::tuple<at::Tensor, at::Tensor> rkd_distance_cpu(const at::Tensor& student, const at::Tensor& teacher, bool compute_grad) {
  check_pair(student, teacher, "rkd_distance_forward", 2);
  const at::ScalarType type = compute_type(student);
  const int64_t n = student.size(0), d = student.size(1);
  const double close_d2 = 1.0 / (kCloseRatio * kCloseRatio);
  at::Tensor ds, dt;
  std::vector<double> g;
  at::Tensor rows = sq_dists_same_type(student, type, 1.0, &ds, close_d2, &g);
  sq_dists_same_type(teacher, type, 1.0, &dt, close_d2);
  double loss = 0;
  ClosePairs close(n);
  CloseTerms close_z(n);
  AT_DISPATCH_FLOATING_TYPES(type, "rkd_distance", [&] {
    if (compute_grad) close = close_pairs<scalar_t>(ds.const_data_ptr<scalar_t>(), g, n);
    loss = rkd_distance_passes<scalar_t>(ds.data_ptr<scalar_t>(), dt.data_ptr<scalar_t>(), n, compute_grad, close, &close_z);
  });
  if (!compute_grad) return {scalar_loss(loss, student), at::empty({0}, student.options())};
  at::Tensor grad = at::mm(ds, rows);
  // The close pairs' terms, z_ij (x_i − x_j) from the input rows (serial: a pair updates two rows).
  AT_DISPATCH_FLOATING_TYPES(type, "rkd_distance_close", [&] {
    using G = scalar_t;
    G* gp = grad.data_ptr<G>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "rkd_distance_close_rows", [&] {
      const scalar_t* xp = student.const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < n; ++i) {
        for (const auto& [j, z] : close_z[i]) {
          for (int64_t k = 0; k < d; ++k) {
            const double v = z * (double(xp[i * d + k]) - double(xp[j * d + k]));
            gp[i * d + k] += G(v);
            gp[j * d + k] -= G(v);
          }
        }
      }
    });
  });
  return {scalar_loss(loss, student), grad.to(student.scalar_type())};
}

// ---------------------------------------------------------------------------------------------
// RKD angle: squared distances (float64 Gram), the triplet loop (relational_kernel.h), M
// assembled in place from Psym (upper triangle) and S + Sᵀ (strictly lower triangle), then the
// terms of exact duplicates (see the top of relational_kernel.h for the math and the notation).
// ---------------------------------------------------------------------------------------------

// Adds (2/B³)(Pdeg + S − T) to M: the terms of zero difference vectors x_j = e_j − e_i (an exact
// duplicate e_j = e_i, j != i, in the student), nonzero only in the rows of such duplicates. There
// cos^s_ijk = 0, so H^i_jk = clamp(−cos^t_ijk), and per vertex i with duplicates J_i:
//   Pdeg:  M_jk += H^i_jk p_j q_k               (j in J_i, every k; p_j = 1/ε)
//   S − T: M_ik += p_k Σ_m H^i_km q_m           (k in J_i: T_ik = 0, S_ik is in the first term)
//          M_ik −= q_k Σ_{j in J_i} H^i_kj p_j  (k not degenerate: the part of T_ik that S_ik lacks)
// O(duplicate pairs × B); serial (duplicates are rare, and the updates of a group share rows).
template <class C>
void angle_duplicate_terms(const C* hs, const C* ht, int64_t n, C* m, C scale, const uint8_t* skip) {
  const C eps = C(kNormEps), eps2 = C(kNormEps * kNormEps);
  auto q = [&](const C* h, int64_t i, int64_t k) -> C {
    const C d2 = 2 * h[i * n + k];
    return d2 >= eps2 ? C(1) / std::sqrt(d2) : C(0);
  };
  auto cos_t = [&](int64_t i, int64_t a, int64_t b) -> C {
    if (a == b) return q(ht, i, a) != C(0) ? C(1) : C(0);
    return ((ht[i * n + a] + ht[i * n + b]) - ht[a * n + b]) * (q(ht, i, a) * q(ht, i, b));
  };
  std::vector<int64_t> dup;
  std::vector<C> p_dup, q_s(n);
  for (int64_t i = 0; i < n; ++i) {
    if (skip && skip[i]) continue;
    dup.clear();
    p_dup.clear();
    for (int64_t j = 0; j < n; ++j) {
      if (j != i && 2 * hs[i * n + j] < eps2) {
        dup.push_back(j);
        p_dup.push_back(C(1) / std::max(eps, std::sqrt(2 * hs[i * n + j])));
      }
    }
    if (dup.empty()) continue;
    for (int64_t k = 0; k < n; ++k) q_s[k] = q(hs, i, k);
    for (size_t a = 0; a < dup.size(); ++a) {
      const int64_t j = dup[a];
      C sigma = 0;
      for (int64_t k = 0; k < n; ++k) {
        if (q_s[k] == C(0)) continue;
        const C h = clamp1(-cos_t(i, j, k));
        m[j * n + k] += scale * (h * p_dup[a] * q_s[k]);
        sigma += h * q_s[k];
      }
      m[i * n + j] += scale * (p_dup[a] * sigma);
    }
    for (int64_t k = 0; k < n; ++k) {
      if (q_s[k] == C(0)) continue;
      C tau = 0;
      for (size_t a = 0; a < dup.size(); ++a) tau += clamp1(-cos_t(i, k, dup[a])) * p_dup[a];
      m[i * n + k] -= scale * (q_s[k] * tau);
    }
  }
}

// A vertex is thin when its longest nonzero difference exceeds kThinRatio times its shortest, in
// the student or the teacher: its triplets then run in double (see "Precision" at the top of
// relational_kernel.h). Writes the mask (1 = thin) and returns how many.
constexpr double kThinRatio = 4.0;

template <class C>
int64_t thin_vertices(const C* hs, const C* ht, int64_t n, uint8_t* thin) {
  const C eps2 = C(kNormEps * kNormEps), ratio2 = C(kThinRatio * kThinRatio);
  std::vector<uint8_t> flag(n);
  for_rows(n, [&](int64_t i) {
    bool is_thin = false;
    for (const C* h : {hs + i * n, ht + i * n}) {
      C lo = std::numeric_limits<C>::infinity(), hi = 0;
      for (int64_t k = 0; k < n; ++k) {
        if (k == i || !(2 * h[k] >= eps2)) continue;  // degenerate (or NaN) differences do not count
        lo = std::min(lo, h[k]);
        hi = std::max(hi, h[k]);
      }
      is_thin = is_thin || hi > ratio2 * lo;  // h = d² / 2: the ratio of squares
    }
    flag[i] = is_thin;
  });
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += (thin[i] = flag[i]);
  return count;
}

// The triplet loop over the vertices not in `skip` (all when null), in C, and M assembled in place
// from Psym (upper triangle) and S + Sᵀ (strictly lower triangle), then the terms of exact
// duplicates. Returns the loss's partial sum (before the 1/B³); m is [n, n] of C, zero on entry.
template <class C>
double angle_pass(const at::Tensor& hs, const at::Tensor& ht, const uint8_t* skip, bool compute_grad, at::Tensor& m_out) {
  const int64_t n = hs.size(0);
  const int64_t block_rows = cpu::pick_isa(avx512::rkd_angle_block_rows, avx2::rkd_angle_block_rows, scalar::rkd_angle_block_rows)();
  const int64_t n_blocks = (n + block_rows - 1) / block_rows;
  m_out = at::zeros({n, n}, hs.options());
  at::Tensor rowsum = at::empty({n_blocks, n}, hs.options());
  std::vector<double> loss_blocks(n_blocks);
  const size_t scratch = cpu::pick_isa(avx512::rkd_angle_scratch_bytes, avx2::rkd_angle_scratch_bytes,
                                       scalar::rkd_angle_scratch_bytes)(n, hs.element_size());
  auto blocks = [&] {
    if constexpr (std::is_same_v<C, float>) {
      return cpu::pick_isa(avx512::rkd_angle_blocks_f32, avx2::rkd_angle_blocks_f32, scalar::rkd_angle_blocks_f32);
    } else {
      return cpu::pick_isa(avx512::rkd_angle_blocks_f64, avx2::rkd_angle_blocks_f64, scalar::rkd_angle_blocks_f64);
    }
  }();
  const C* hsp = hs.const_data_ptr<C>();
  const C* htp = ht.const_data_ptr<C>();
  C* m = m_out.data_ptr<C>();
  C* rsp = rowsum.data_ptr<C>();
  at::parallel_for(0, n_blocks, 1, [&](int64_t b, int64_t e) {
    std::unique_ptr<char[]> buf(new char[scratch]);
    blocks(hsp, htp, n, m, rsp, loss_blocks.data(), b, e, buf.get(), skip);
  });
  if (compute_grad) {
    // M = (2 / B³) (P − S − Sᵀ + diag(S·1)), symmetric.
    const C scale = C(2.0 / (double(n) * double(n) * double(n)));
    for_rows(n, [&](int64_t j) {
      for (int64_t k = j + 1; k < n; ++k) {
        const C v = (m[j * n + k] - m[k * n + j]) * scale;
        m[j * n + k] = v;
        m[k * n + j] = v;
      }
      C row = 0;
      for (int64_t b = 0; b < n_blocks; ++b) row += rsp[b * n + j];
      m[j * n + j] = (m[j * n + j] + row) * scale;
    });
    angle_duplicate_terms<C>(hsp, htp, n, m, scale, skip);
  }
  return sum_in_order(loss_blocks);
}

std::tuple<at::Tensor, at::Tensor> rkd_angle_cpu(const at::Tensor& student, const at::Tensor& teacher, bool compute_grad) {
  check_pair(student, teacher, "rkd_angle_forward", 2);
  const at::ScalarType type = compute_type(student);
  const int64_t n = student.size(0);
  const double n3 = double(n) * double(n) * double(n);
  // h = d² / 2; the teacher's first, so that its float64 rows are freed before the student's.
  at::Tensor hs, ht;
  sq_dists_via_double(teacher, type, 0.5, &ht);
  at::Tensor rows = sq_dists_via_double(student, type, 0.5, &hs);
  at::Tensor m;
  if (type == at::kDouble) {
    const double loss = angle_pass<double>(hs, ht, nullptr, compute_grad, m) / n3;
    if (!compute_grad) return {scalar_loss(loss, student), at::empty({0}, student.options())};
    hs.reset();
    ht.reset();
    return {scalar_loss(loss, student), finish_grad(m, rows, student)};
  }
  std::vector<uint8_t> thin(n), fat(n);
  const int64_t n_thin = thin_vertices<float>(hs.const_data_ptr<float>(), ht.const_data_ptr<float>(), n, thin.data());
  double loss = 0;
  at::Tensor grad;  // float, or double once the thin vertices' share is in
  if (n_thin < n) {
    loss += angle_pass<float>(hs, ht, n_thin ? thin.data() : nullptr, compute_grad, m);
    if (compute_grad) grad = at::mm(m, rows);
  }
  hs.reset();
  ht.reset();
  if (n_thin) {
    // The thin vertices in double, from unrounded h (a second float64 Gram per network).
    for (int64_t i = 0; i < n; ++i) fat[i] = !thin[i];
    at::Tensor hs64, ht64, m64;
    sq_dists_via_double(teacher, at::kDouble, 0.5, &ht64);
    at::Tensor rows64 = sq_dists_via_double(student, at::kDouble, 0.5, &hs64);
    loss += angle_pass<double>(hs64, ht64, n_thin < n ? fat.data() : nullptr, compute_grad, m64);
    if (compute_grad) grad = n_thin < n ? at::mm(m64, rows64).add_(grad) : at::mm(m64, rows64);
  }
  loss /= n3;
  if (!compute_grad) return {scalar_loss(loss, student), at::empty({0}, student.options())};
  return {scalar_loss(loss, student), grad.to(student.scalar_type())};  // rounded once
}

// ---------------------------------------------------------------------------------------------
// SP. Ĝ_i = G_i / m_i, m_i = max(‖G_i‖, ε); R = 2 (Ĝ_s − Ĝ_t) / B²;
//   dG_i = R_i / m_i − [‖G_i‖ ≥ ε] (R_i · G_i) G_i / (‖G_i‖ m_i²);   dF = (dG + dGᵀ) F.
// ---------------------------------------------------------------------------------------------

template <class C>
double sp_passes(C* gs, C* gt, int64_t n, bool grad) {
  std::vector<double> ns(n), nt(n), row_loss(n);
  for_rows(n, [&](int64_t i) {
    double a = 0, b = 0;
    for (int64_t j = 0; j < n; ++j) {
      a += double(gs[i * n + j]) * double(gs[i * n + j]);
      b += double(gt[i * n + j]) * double(gt[i * n + j]);
    }
    ns[i] = std::sqrt(a), nt[i] = std::sqrt(b);
  });
  const C k = C(2.0 / (double(n) * double(n)));
  for_rows(n, [&](int64_t i) {
    const C ms = C(std::max(ns[i], kNormEps)), mt = C(std::max(nt[i], kNormEps));
    double l = 0, dot = 0;
    for (int64_t j = 0; j < n; ++j) {
      const C diff = gs[i * n + j] / ms - gt[i * n + j] / mt;
      l += double(diff) * double(diff);
      dot += double(k * diff) * double(gs[i * n + j]);
    }
    row_loss[i] = l;
    if (!grad) return;
    // gt's row i becomes dG's row i (read-before-write per entry).
    const C norm_coef = ns[i] >= kNormEps ? C(dot / (ns[i] * double(ms) * double(ms))) : C(0);
    for (int64_t j = 0; j < n; ++j) {
      const C r = k * (gs[i * n + j] / ms - gt[i * n + j] / mt);
      gt[i * n + j] = r / ms - norm_coef * gs[i * n + j];
    }
  });
  if (grad) {
    for_rows(n, [&](int64_t i) {
      for (int64_t j = i; j < n; ++j) {
        const C v = gt[i * n + j] + gt[j * n + i];
        gs[i * n + j] = v;
        gs[j * n + i] = v;
      }
    });
  }
  return sum_in_order(row_loss) / (double(n) * double(n));
}

std::tuple<at::Tensor, at::Tensor> sp_cpu(const at::Tensor& student, const at::Tensor& teacher, bool compute_grad) {
  check_pair(student, teacher, "sp_forward", 1);
  const at::ScalarType type = compute_type(student);
  at::Tensor s = student.to(type), t = teacher.to(type);
  at::Tensor gs = gram_upper(s, /*mirror=*/true), gt = gram_upper(t, /*mirror=*/true);
  double loss = 0;
  AT_DISPATCH_FLOATING_TYPES(type, "sp", [&] {
    loss = sp_passes<scalar_t>(gs.data_ptr<scalar_t>(), gt.data_ptr<scalar_t>(), student.size(0), compute_grad);
  });
  at::Tensor grad = compute_grad ? finish_grad(gs, s, student) : at::empty({0}, student.options());
  return {scalar_loss(loss, student), grad};
}

// ---------------------------------------------------------------------------------------------
// PKT. ñ_i = sqrt(G_ii) + ε, K_ij = G_ij / (ñ_i ñ_j), K' = (K + 1) / 2, r_i = Σ_j K'_ij,
// P = K' / r; L = Σ P_t log((P_t + ε) / (P_s + ε)) / B². Backward (student):
//   dP = −P_t / (P_s + ε) / B²,  dK_ij = (dP_ij − Σ_m dP_im P_im) / (2 r_i),
//   dñ_i = −Σ_j (dK_ij + dK_ji) K_ij / ñ_i,
//   M_ij = (dK_ij + dK_ji) / (ñ_i ñ_j) (i != j),  M_ii = 2 dK_ii / ñ_i² + [G_ii > 0] dñ_i / sqrt(G_ii),
//   dF = M F.
// ---------------------------------------------------------------------------------------------

template <class C>
double pkt_passes(C* gs, C* gt, int64_t n, double eps, bool grad) {
  std::vector<C> root_s(n), ns(n), nt(n);
  for (int64_t i = 0; i < n; ++i) {
    root_s[i] = std::sqrt(gs[i * n + i]);
    ns[i] = root_s[i] + C(eps);
    nt[i] = std::sqrt(gt[i * n + i]) + C(eps);
  }
  std::vector<double> rs(n), rt(n), row_loss(n);
  for_rows(n, [&](int64_t i) {
    double a = 0, b = 0;
    for (int64_t j = 0; j < n; ++j) {
      a += double((gs[i * n + j] / (ns[i] * ns[j]) + C(1)) / C(2));
      b += double((gt[i * n + j] / (nt[i] * nt[j]) + C(1)) / C(2));
    }
    rs[i] = a, rt[i] = b;
  });
  const C ce = C(eps);
  const C inv_b2 = C(1.0 / (double(n) * double(n)));
  for_rows(n, [&](int64_t i) {
    const C irs = C(1.0 / rs[i]), irt = C(1.0 / rt[i]);
    auto probs = [&](int64_t j, C* ps, C* pt) {
      *ps = (gs[i * n + j] / (ns[i] * ns[j]) + C(1)) / C(2) * irs;
      *pt = (gt[i * n + j] / (nt[i] * nt[j]) + C(1)) / C(2) * irt;
    };
    double l = 0, dot = 0;
    for (int64_t j = 0; j < n; ++j) {
      C ps, pt;
      probs(j, &ps, &pt);
      l += double(pt * std::log((pt + ce) / (ps + ce)));
      dot += double(-pt / (ps + ce) * inv_b2) * double(ps);
    }
    row_loss[i] = l;
    if (!grad) return;
    const C cdot = C(dot), half_irs = C(0.5 / rs[i]);
    for (int64_t j = 0; j < n; ++j) {  // gt's row i becomes dK's row i
      C ps, pt;
      probs(j, &ps, &pt);
      gt[i * n + j] = (-pt / (ps + ce) * inv_b2 - cdot) * half_irs;
    }
  });
  if (grad) {
    for_rows(n, [&](int64_t i) {  // gs's row i becomes M's row i (its diagonal last)
      double dn = 0;
      C mii = 0;
      for (int64_t j = 0; j < n; ++j) {
        const C nn = ns[i] * ns[j];
        const C k = gs[i * n + j] / nn;
        const C dsym = gt[i * n + j] + gt[j * n + i];
        dn -= double(dsym) * double(k);
        if (j == i) {
          mii = dsym / nn;  // = 2 dK_ii / ñ_i²
        } else {
          gs[i * n + j] = dsym / nn;
        }
      }
      dn /= double(ns[i]);
      gs[i * n + i] = mii + (root_s[i] > C(0) ? C(dn / double(root_s[i])) : C(0));
    });
  }
  return sum_in_order(row_loss) / (double(n) * double(n));
}

std::tuple<at::Tensor, at::Tensor> pkt_cpu(const at::Tensor& student, const at::Tensor& teacher, double eps, bool compute_grad) {
  check_pair(student, teacher, "pkt_forward", 1);
  TORCH_CHECK(eps > 0, "fastkd::pkt_forward: eps must be > 0, got ", eps);
  const at::ScalarType type = compute_type(student);
  at::Tensor s = student.to(type), t = teacher.to(type);
  at::Tensor gs = gram_upper(s, /*mirror=*/true), gt = gram_upper(t, /*mirror=*/true);
  double loss = 0;
  AT_DISPATCH_FLOATING_TYPES(type, "pkt", [&] {
    loss = pkt_passes<scalar_t>(gs.data_ptr<scalar_t>(), gt.data_ptr<scalar_t>(), student.size(0), eps, compute_grad);
  });
  at::Tensor grad = compute_grad ? finish_grad(gs, s, student) : at::empty({0}, student.options());
  return {scalar_loss(loss, student), grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("rkd_distance_forward", &rkd_distance_cpu);
  m.impl("rkd_angle_forward", &rkd_angle_cpu);
  m.impl("sp_forward", &sp_cpu);
  m.impl("pkt_forward", &pkt_cpu);
}

}  // namespace fastkd
