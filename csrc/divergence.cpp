// parse_divergence (divergence.h): the rules' torch-facing errors.
#include "divergence.h"

#include <c10/util/Exception.h>

#include <string>

namespace fastkd {

Divergence parse_divergence(std::string_view name, double* beta, const char* op) {
  const DivergenceRule* r = find_divergence(name);
  if (r == nullptr) {
    std::string names;  // the table's, so that a new divergence is listed without another edit
    for (const DivergenceRule& rule : kDivergenceRules) names += (names.empty() ? "" : ", ") + std::string(rule.name);
    TORCH_CHECK(false, op, ": divergence must be one of ", names, ", got \"", std::string(name), "\"");
  }
  TORCH_CHECK(beta_in_range(*r, *beta), op, ": beta must be in [0, ", r->beta_one_ok ? "1]" : "1)", " for divergence ",
              r->name, ", got ", *beta);
  return collapse_endpoint(*r, *beta);
}

}  // namespace fastkd
