// RKD angle loss on the CPU: the B³ triplet loop, in O(B²) memory, generic over the vector type.
//
// Included (through kernels.h) by isa_{avx512,avx2,scalar}.cpp inside namespace fastkd::<isa>,
// after the matching vec_*.h; the same algorithm is thereby compiled once per instruction set.
// The torch side (GEMMs, squared distances, the final dE = M·E) is relational_cpu.cpp.
//
// ---------------------------------------------------------------------------------------------
// Math. Embeddings e_1..e_B (rows of E), G = E·Eᵀ. For a vertex i let x_j = e_j − e_i and
//
//   A^i_jk = <x_j, x_k> = G_jk − G_ij − G_ik + G_ii = (d²_ij + d²_ik − d²_jk) / 2,
//   r_j = ‖x_j‖ = sqrt(A^i_jj) = d_ij,   m_j = max(r_j, ε),   ε = 1e-12 (F.normalize's eps),
//   cos_jk = <n(x_j), n(x_k)> = A^i_jk / (m_j m_k),   n(x) = x / max(‖x‖, ε).
//
// x_j is "degenerate" when r_j < ε (e_j == e_i; always for j == i): n(x_j) = x_j / ε, which is
// 0 for a zero vector, so cos_jk = 0 exactly whenever x_j or x_k is degenerate (taken as 0 here,
// which is exact for zero vectors; see the docstring of fastkd.rkd_angle_loss).
//
//   L = (1/B³) Σ_i Σ_jk h(cos^s_ijk − cos^t_ijk),  h = smooth L1 (β = 1),
//   H^i_jk = h'(cos^s − cos^t) = clamp(cos^s − cos^t, −1, 1)   (the 1/B³ is applied at the end).
//
// Gradient w.r.t. A^i (student; the teacher is a constant). With the differential
// dm_j = [r_j ≥ ε] dA_jj / (2 m_j) and the symmetry of H^i and cos^i in (j, k):
//
//   dL^i = Σ_jk H_jk [dA_jk / (m_j m_k) − cos_jk (dm_j / m_j + dm_k / m_k)]
//        = Σ_jk H_jk dA_jk / (m_j m_k) − Σ_j [r_j ≥ ε] c_j dA_jj / m_j²,   c_j = Σ_k H_jk cos_jk,
//
//   so  ∂L^i/∂A^i_jk = H_jk p_j p_k − δ_jk [r_j ≥ ε] c_j p_j²,   p_j = 1 / m_j,
//
// and in terms of the rows, the gradient w.r.t. x_j is Σ_k Ω^i_jk x_k with
//
//   Ω^i_jk = H_jk p_j q_k − δ_jk [r_j ≥ ε] c_j p_j²,   q_k = [r_k ≥ ε] p_k.
//
// For a degenerate x_j, m_j = ε is a constant of the clamp: no norm term, and H p_j q_k =
// H / (ε m_k) is exactly F.normalize's gradient x_k / (ε m_k) (huge: the reference's gradient
// explodes when the student has duplicates the teacher has not). A degenerate x_k gets weight 0:
// x_k is a zero vector, so the term is exactly 0, and keeping its ~1e12 weight would turn rounding
// into garbage in every other row. Ω^i is therefore not symmetric where degenerate vectors meet.
//
// Through A^i_jk = G_jk − G_ij − G_ik + G_ii, dE = Σ_i [row j += Σ_k Ω^i_jk x_k, row i −= the same
// summed over j] = M·E with
//
//   M = (2 / B³) (P − Sᵀ − T + diag(S·1)),   P = Σ_i Ω^i,  S_ij = Σ_k Ω^i_jk,  T_ik = Σ_j Ω^i_jk
//
// (for a symmetric Ω this is dE = (∂L/∂G + ∂L/∂Gᵀ) E with ∂L/∂G = (1/B³)(P − 2S + diag(S·1))).
// M's rows and columns sum to zero, so E may be replaced by the centred embeddings, as
// relational_cpu.cpp does. Split Ω = Ωsym + Ωdeg with Ωsym_jk = H q_j q_k − (the norm term),
// symmetric, and Ωdeg_jk = [r_j < ε] H p_j q_k, nonzero only where vertex i has an exact duplicate
// e_j = e_i (j != i; for j = i, H^i_ik = clamp(0 − 0) = 0 since x_i^i is degenerate for the student
// and the teacher alike). Then
//
//   M = (2 / B³) (Psym − S − Sᵀ + diag(S·1))  +  (2 / B³) (Pdeg + S − T),
//
// with S the exact row sums (of Ω, degenerate rows included). This kernel computes the first,
// symmetric term; the second is nonzero only in rows that have an exact duplicate in the student
// batch, and relational_cpu.cpp adds it there in O(duplicate pairs × B), from the teacher's cosines
// alone (where x_j is degenerate, cos^s = 0 and H = clamp(−cos^t)).
//
// ---------------------------------------------------------------------------------------------
// Precision: thin triangles. Let ρ_i = max_k r_ik / min_k r_ik over vertex i's nonzero differences,
// u the unit roundoff of the type the loop runs in. Three errors grow with ρ_i:
//   - cosines: h is stored rounded (|δh| ≤ u h), so A_jk = h_ij + h_ik − h_jk is off by
//     u (h_ij + h_ik + h_jk) ≤ u (r_j + r_k)², and cos_jk by u (r_j + r_k)² / (r_j r_k) ≈ u ρ_i;
//     [n(x_j), n(x_k)] from the differences themselves (the composite) is off by ~u;
//   - the norm terms: row j's gradient from vertex i is p_j Σ_k H_jk (n(x_k) − cos_jk n(x_j)),
//     formed as the difference of Σ H p_j q_k x_k and c_j p_j² x_j; on a collinear triangle the
//     two cancel exactly, so a cosine error δ leaves p_j Σ H δ, ρ_i times the composite's;
//   - the final GEMM: Ω^i_jk x_k enters M·E as Ω^i_jk e_k − Ω^i_jk e_i, with |e| ≤ (ρ_i + 1) r_ik
//     for centred rows (the centroid lies in the hull, so |e_i| ≤ max_k r_ik); the GEMM's error,
//     u |Ω^i_jk| (|e_k| + |e_i|), is up to 2ρ_i + 1 times the term's own rounding, u |Ω^i_jk| r_ik.
// Collinear batches (every ρ_i large, and every triangle thin) and near-duplicate rows (ρ_i ≈
// R / r for a pair at distance r in a batch of spread R) lose ~ρ_i to ρ_i² digits: 1e3-1e4 times
// the composite's error in float32. Hence: a vertex whose ρ_i > kThinRatio (student or teacher)
// is "thin", and relational_cpu.cpp runs it in double (h from the float64 Gram, unrounded; its
// Ω summed into a double M; its share of dE = M·E a double GEMM); this loop then runs twice,
// in float over the other vertices and in double over the thin ones (the `skip` masks), and
// M·E = M_float·E + M_double·E. The errors above are then at most ~2 kThinRatio + 1 times the
// term's own rounding in float, and ρ_i u_double (negligible) for the thin vertices. A batch with
// no thin vertex (a random batch in more than a handful of dimensions: ρ ≈ 1.1 at D = 2048) runs
// exactly as before. Float64 input runs everything in double (one pass, no mask).
//
// ---------------------------------------------------------------------------------------------
// Work. The inputs are h_s = d²_s / 2 and h_t = d²_t / 2 (B×B, exactly symmetric, zero
// diagonal), so A^i_jk = h_ij + h_ik − h_jk. Per triplet (vectorised over k):
//
//   cos_s = ((h_ij + h_ik) − h_jk) · (q_j q_k),    q = [r ≥ ε] / r   (0 for degenerate)
//   cos_t = the same on the teacher                (cos_jj: exactly 1, or 0 when degenerate)
//   c = clamp(cos_s − cos_t, −1, 1);  loss += c (d − c/2)      (= h(d), NaN kept)
//   w = c q_k;   P_jk += q_j w;   σ_j += w;   C_j += c cos_s
//
// and afterwards S_ij = p_j σ_j − [r_j ≥ ε] C_j p_j², P_jj −= Σ_i [r_j ≥ ε] C_j p_j².
// ~18 vector operations and 8 loads per L triplets; no transcendental in the loop (r, p, q of
// vertex i are computed once per (i, k-tile) and shared by the tile's kJ rows j).
//
// Parallelism and memory: rows j are split into blocks of kJ; a task owns its blocks' rows of P
// (so P needs no reduction) and visits k in tiles of kK columns so that the tile's h_s, h_t and P
// (3 kJ×kK) and vertex i's k-vectors (4 kK) stay in L1 while i sweeps the batch. Per (i, j) the
// sums σ, C live in a task-local [B × kJ] scratch across k-tiles. At the end of a block, S's
// column block S[:, J] is added into the strictly lower triangle of the output matrix (slot
// (max(i,j), min(i,j)) receives S_ij + S_ji, hence two atomic adds onto zero: the result does not
// depend on their order), Psym's rows go to the upper triangle, and the row sums of S go to a
// per-block partial vector; relational_cpu.cpp then assembles M in place. Extra memory: h_s, h_t
// and this one B×B matrix, plus O(B·kJ) per task.
#pragma once

namespace rel {

// Rows j per block, columns k per tile: 3 × kJ × kK × 4 bytes = 24 KB of tiles for float.
constexpr int64_t kJ = 16;
constexpr int64_t kK = 128;

// The few vector operations this kernel needs beyond vec_*.h, chosen by the vector type.
template <class V>
static inline V v_sqrt(V x) {
  if constexpr (V::L == 1) {
    return {std::sqrt(x.v)};
  } else if constexpr (V::L == 8) {
    return {_mm256_sqrt_ps(x.v)};
  } else {
    return {_mm512_sqrt_ps(x.v)};
  }
}

template <class V>
static inline V v_div(V a, V b) {
  if constexpr (V::L == 1) {
    return {a.v / b.v};
  } else if constexpr (V::L == 8) {
    return {_mm256_div_ps(a.v, b.v)};
  } else {
    return {_mm512_div_ps(a.v, b.v)};
  }
}

// min(a, x) returning x where x is NaN (vminps returns its second operand then); V::max is the
// same for max.
template <class V>
static inline V v_min(V a, V x) {
  if constexpr (V::L == 1) {
    return {(x.v != x.v || x.v < a.v) ? x.v : a.v};
  } else if constexpr (V::L == 8) {
    return {_mm256_min_ps(a.v, x.v)};
  } else {
    return {_mm512_min_ps(a.v, x.v)};
  }
}

// x where a >= b, else 0 (NaN compares false).
template <class V>
static inline V v_keep_ge(V a, V b, V x) {
  if constexpr (V::L == 1) {
    return {a.v >= b.v ? x.v : decltype(x.v)(0)};
  } else if constexpr (V::L == 8) {
    return {_mm256_and_ps(_mm256_cmp_ps(a.v, b.v, _CMP_GE_OQ), x.v)};
  } else {
    return {_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a.v, b.v, _CMP_GE_OQ), x.v)};
  }
}

// Atomic x += v on a float or double (a compare-and-swap loop on its bits).
template <class C>
static inline void atomic_add(C* x, C v) {
  using U = std::conditional_t<sizeof(C) == 4, uint32_t, uint64_t>;
  U* bits = reinterpret_cast<U*>(x);
  U old = __atomic_load_n(bits, __ATOMIC_RELAXED);
  for (;;) {
    C f;
    std::memcpy(&f, &old, sizeof f);
    f += v;
    U next;
    std::memcpy(&next, &f, sizeof next);
    if (__atomic_compare_exchange_n(bits, &old, next, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return;
  }
}

// Elements of task-local scratch the kernel needs for a batch of n (plus 64 bytes of alignment).
constexpr int64_t scratch_elems(int64_t n) { return 5 * n * kJ + 3 * kJ * kK + 4 * kK; }

// The row blocks [block_begin, block_end) of the triplet loop (blocks of kJ rows j).
//   hs, ht: [n, n] h = d² / 2, symmetric, zero diagonal.
//   pu:     [n, n] zero on entry; gets P in its upper triangle (diagonal included) and S + Sᵀ
//           in its strictly lower triangle.
//   rowsum: [n_blocks, n] per-block partial row sums of S (row b written by block b).
//   loss:   [n_blocks] per-block partial sums of h(cos^s − cos^t) (before the 1/B³).
//   skip:   [n] or null: vertices i whose triplets this call leaves out (1 = skip).
template <class V>
static void angle_blocks(const typename V::scalar* hs, const typename V::scalar* ht, int64_t n, typename V::scalar* pu,
                         typename V::scalar* rowsum, double* loss, int64_t block_begin, int64_t block_end, void* scratch,
                         const uint8_t* skip) {
  using C = typename V::scalar;
  constexpr int L = V::L;
  static_assert(kK % L == 0, "the k-tile must hold whole vectors");
  const C eps = C(1e-12);
  const C eps2 = C(1e-24);
  // Task-local scratch, 64-byte aligned.
  C* base = reinterpret_cast<C*>((reinterpret_cast<uintptr_t>(scratch) + 63) & ~uintptr_t(63));
  C* sig = base;               // [n, kJ]  σ_ij = Σ_k c p'_k
  C* cc = sig + n * kJ;        // [n, kJ]  C_ij = Σ_k c cos_s
  C* jps = cc + n * kJ;        // [n, kJ]  p_s[i, j]
  C* jqs = jps + n * kJ;       // [n, kJ]  q_s[i, j]
  C* jqt = jqs + n * kJ;       // [n, kJ]  q_t[i, j]
  C* ths = jqt + n * kJ;       // [kJ, kK] h_s[j, k] of the tile
  C* tht = ths + kJ * kK;      // [kJ, kK] h_t[j, k]
  C* tp = tht + kJ * kK;       // [kJ, kK] P[j, k] accumulated over i
  C* ahs = tp + kJ * kK;       // [kK] h_s[i, k]
  C* aht = ahs + kK;           // [kK] h_t[i, k]
  C* aqs = aht + kK;           // [kK] q_s[i, k]
  C* aqt = aqs + kK;           // [kK] q_t[i, k]

  const V veps2 = V::set1(eps2), vone = V::set1(C(1)), vmone = V::set1(C(-1));
  const V vtwo = V::set1(C(2)), vhalf = V::set1(C(0.5)), vzero = V::set1(C(0));
  alignas(64) C onehot[2 * L] = {};
  onehot[L] = C(1);

  for (int64_t blk = block_begin; blk < block_end; ++blk) {
    const int64_t j0 = blk * kJ;
    const int64_t jn = std::min(kJ, n - j0);
    std::fill(sig, sig + n * kJ, C(0));
    std::fill(cc, cc + n * kJ, C(0));
    double loss_blk = 0;
    // Vertex i's row-j scalars, once per block (the k-tiles reuse them).
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t jj = 0; jj < jn; ++jj) {
        const C d2s = 2 * hs[i * n + j0 + jj], d2t = 2 * ht[i * n + j0 + jj];
        const C p = C(1) / std::max(eps, std::sqrt(d2s));
        jps[i * kJ + jj] = p;
        jqs[i * kJ + jj] = d2s >= eps2 ? p : C(0);
        jqt[i * kJ + jj] = d2t >= eps2 ? C(1) / std::sqrt(d2t) : C(0);
      }
    }

    for (int64_t k0 = 0; k0 < n; k0 += kK) {
      const int64_t kn = std::min(kK, n - k0);
      const int64_t kp = (kn + L - 1) / L * L;  // whole vectors; the padding contributes nothing
      for (int64_t jj = 0; jj < kJ; ++jj) {
        for (int64_t kk = 0; kk < kp; ++kk) {
          const bool in = jj < jn && kk < kn;
          ths[jj * kK + kk] = in ? hs[(j0 + jj) * n + k0 + kk] : C(0);
          tht[jj * kK + kk] = in ? ht[(j0 + jj) * n + k0 + kk] : C(0);
          tp[jj * kK + kk] = C(0);
        }
      }

      for (int64_t i = 0; i < n; ++i) {
        if (skip && skip[i]) continue;
        const C* hsi = hs + i * n;
        const C* hti = ht + i * n;
        // Vertex i's k-vectors. Padding: h = 0 is degenerate, so q = 0 and every term is 0.
        for (int64_t kk = 0; kk < kp; ++kk) {
          ahs[kk] = kk < kn ? hsi[k0 + kk] : C(0);
          aht[kk] = kk < kn ? hti[k0 + kk] : C(0);
        }
        for (int64_t kk = 0; kk < kp; kk += L) {
          const V d2s = vtwo * V::load(ahs + kk), d2t = vtwo * V::load(aht + kk);
          v_keep_ge(d2s, veps2, v_div(vone, v_sqrt(d2s))).store(aqs + kk);  // NaN: q = 0, h NaN
          v_keep_ge(d2t, veps2, v_div(vone, v_sqrt(d2t))).store(aqt + kk);
        }
        for (int64_t jj = 0; jj < jn; ++jj) {
          const int64_t j = j0 + jj;
          const C hsj = hsi[j], htj = hti[j];
          const C qsj = jqs[i * kJ + jj], qtj = jqt[i * kJ + jj];
          const bool nondeg_j = 2 * hsj >= eps2;
          const V vhsj = V::set1(hsj), vhtj = V::set1(htj), vqsj = V::set1(qsj), vqtj = V::set1(qtj);
          const C* rs = ths + jj * kK;
          const C* rt = tht + jj * kK;
          C* rp = tp + jj * kK;
          // The triplet (i, j, j), if this tile holds k = j: its cosine is exactly 1 (0 when x_j
          // is degenerate), which d² q² only approximates.
          const int64_t kkj = j - k0 < 0 || j - k0 >= kn ? int64_t(-1) : j - k0;
          const int64_t kvj = kkj < 0 ? int64_t(-1) : kkj - kkj % L;
          const V vjs = V::set1(nondeg_j ? C(1) : C(0)), vjt = V::set1(qtj != C(0) ? C(1) : C(0));
          V acc_loss = vzero, acc_sig = vzero, acc_c = vzero;
          for (int64_t kk = 0; kk < kp; kk += L) {
            V cs = ((vhsj + V::load(ahs + kk)) - V::load(rs + kk)) * (vqsj * V::load(aqs + kk));
            V ct = ((vhtj + V::load(aht + kk)) - V::load(rt + kk)) * (vqtj * V::load(aqt + kk));
            if (kk == kvj) {
              const V lane = V::load(onehot + L - (kkj - kvj));  // 1 in lane kkj - kvj, else 0
              cs = V::fma(lane, vjs - cs, cs);
              ct = V::fma(lane, vjt - ct, ct);
            }
            const V d = cs - ct;
            const V c = v_min(vone, V::max(vmone, d));
            acc_loss = V::fma(c, d - vhalf * c, acc_loss);
            const V w = c * V::load(aqs + kk);
            acc_sig = acc_sig + w;
            V::fma(vqsj, w, V::load(rp + kk)).store(rp + kk);
            acc_c = V::fma(c, cs, acc_c);
          }
          sig[i * kJ + jj] += acc_sig.sum();
          cc[i * kJ + jj] += acc_c.sum();
          loss_blk += double(acc_loss.sum());
        }
      }

      // P's rows of this tile: the upper triangle only (the lower is its mirror).
      for (int64_t jj = 0; jj < jn; ++jj) {
        const int64_t j = j0 + jj;
        for (int64_t kk = std::max<int64_t>(0, j - k0); kk < kn; ++kk) pu[j * n + k0 + kk] = tp[jj * kK + kk];
      }
    }

    // S's column block, the norm terms of Ω's diagonal, S's row sums.
    C* rs_blk = rowsum + blk * n;
    C diag[kJ] = {};
    for (int64_t i = 0; i < n; ++i) {
      C row = 0;
      if (skip && skip[i]) {
        rs_blk[i] = row;
        continue;
      }
      for (int64_t jj = 0; jj < jn; ++jj) {
        const int64_t j = j0 + jj;
        const C p = jps[i * kJ + jj];
        const C norm_term = 2 * hs[i * n + j] >= eps2 ? cc[i * kJ + jj] * p * p : C(0);
        const C s = p * sig[i * kJ + jj] - norm_term;
        diag[jj] += norm_term;
        row += s;
        if (i != j) atomic_add(pu + std::max(i, j) * n + std::min(i, j), s);
      }
      rs_blk[i] = row;
    }
    for (int64_t jj = 0; jj < jn; ++jj) pu[(j0 + jj) * n + j0 + jj] -= diag[jj];
    loss[blk] = loss_blk;
  }
}

}  // namespace rel

// The entry points: float (this instruction set's vectors) and double (scalar), and the sizes
// the caller needs: rows per block, scratch bytes per task.
int64_t rkd_angle_block_rows() { return rel::kJ; }

size_t rkd_angle_scratch_bytes(int64_t n, size_t elem_size) { return size_t(rel::scratch_elems(n)) * elem_size + 64; }

void rkd_angle_blocks_f32(const float* hs, const float* ht, int64_t n, float* pu, float* rowsum, double* loss,
                          int64_t block_begin, int64_t block_end, void* scratch, const uint8_t* skip) {
  rel::angle_blocks<VecF>(hs, ht, n, pu, rowsum, loss, block_begin, block_end, scratch, skip);
}

void rkd_angle_blocks_f64(const double* hs, const double* ht, int64_t n, double* pu, double* rowsum, double* loss,
                          int64_t block_begin, int64_t block_end, void* scratch, const uint8_t* skip) {
  rel::angle_blocks<VecScalar<double>>(hs, ht, n, pu, rowsum, loss, block_begin, block_end, scratch, skip);
}
