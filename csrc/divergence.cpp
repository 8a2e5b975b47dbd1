// parse_divergence (divergence.h): the rules' torch-facing errors.
#include "divergence.h"

#include <c10/util/Exception.h>

#include <string>

namespace fastkd {

Divergence parse_divergence(std::string_view name, double* beta, const char* op) {
  const DivergenceRule* r = find_divergence(name);
  TORCH_CHECK(r != nullptr, op, ": divergence must be one of kl, reverse_kl, jsd, tvd, skew_kl, skew_reverse_kl, got \"",
              std::string(name), "\"");
  TORCH_CHECK(beta_in_range(*r, *beta), op, ": beta must be in [0, ", r->beta_one_ok ? "1]" : "1)", " for divergence ",
              r->name, ", got ", *beta);
  return collapse_endpoint(*r, *beta);
}

}  // namespace fastkd
