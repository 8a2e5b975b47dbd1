// The divergences of the kd family and their rules, decided here once for every backend that
// compiles C++ (docs/design.md#divergences): the names, each one's beta range, the endpoints
// that reduce to another divergence, and the factor of the gradient k q (x - c). The Python
// table (fastkd/ops/divergences.py) states the same rules; tests/test_cpu_divergence_rules.py checks
// that the two agree.
#pragma once
#include <cstdint>
#include <string_view>

namespace fastkd {

// The soft term's divergence between p (teacher, or the teachers' mixture) and q (student).
enum class Divergence : int32_t {
  KL = 0, ReverseKL = 1, JSD = 2, TVD = 3, SkewKL = 4, SkewReverseKL = 5, Hellinger = 6
};

struct DivergenceRule {
  const char* name;
  Divergence divergence;
  bool has_beta;     // takes a beta in [0, 1) ...
  bool beta_one_ok;  // ... or [0, 1]
};

inline constexpr DivergenceRule kDivergenceRules[] = {
    {"kl", Divergence::KL, false, false},         {"reverse_kl", Divergence::ReverseKL, false, false},
    {"jsd", Divergence::JSD, true, true},         {"tvd", Divergence::TVD, false, false},
    {"skew_kl", Divergence::SkewKL, true, false}, {"skew_reverse_kl", Divergence::SkewReverseKL, true, false},
    {"hellinger", Divergence::Hellinger, false, false},
};

// The rule named `name`, or null.
inline const DivergenceRule* find_divergence(std::string_view name) {
  for (const DivergenceRule& r : kDivergenceRules)
    if (name == r.name) return &r;
  return nullptr;
}

inline bool beta_in_range(const DivergenceRule& r, double beta) {
  return !r.has_beta || (beta >= 0 && (r.beta_one_ok ? beta <= 1 : beta < 1));
}

// The divergence a rule computes at `beta` (in range): an endpoint that is another divergence
// becomes it (jsd at 0 is kl and at 1 reverse_kl; skew_kl at 0 is kl, skew_reverse_kl at 0
// reverse_kl), as TRL's and Liger's JSD do.
inline Divergence collapse_endpoint(const DivergenceRule& r, double beta) {
  if (!r.has_beta) return r.divergence;
  if (beta == 0) return r.divergence == Divergence::SkewReverseKL ? Divergence::ReverseKL : Divergence::KL;
  if (beta == 1) return Divergence::ReverseKL;  // jsd, the only one allowed 1
  return r.divergence;
}

// Whether divergence d (an endpoint already collapsed) takes a beta: its rule's has_beta.
inline bool divergence_has_beta(Divergence d) {
  for (const DivergenceRule& r : kDivergenceRules)
    if (r.divergence == d) return r.has_beta;
  return false;
}

// The factor k of a divergence's gradient k q (x - c) (docs/design.md#divergences).
inline double divergence_grad_factor(Divergence d, double beta) {
  switch (d) {
    case Divergence::JSD:
    case Divergence::SkewKL: return 1 - beta;
    case Divergence::TVD:
    case Divergence::Hellinger: return 0.5;
    default: return 1;
  }
}

// The divergence named by an op's string, with its beta (in/out) checked against the rule and an
// endpoint collapsed (collapse_endpoint). Raises (TORCH_CHECK) naming `op` for an unknown name
// or a beta out of range. In divergence.cpp.
Divergence parse_divergence(std::string_view name, double* beta, const char* op);

}  // namespace fastkd
