// AdaGC's relative threshold (Wang et al., 2025) for one scope column, as pytorch-optimizer 4.1.0's
// AdaGC clips; the math and its order are those of torch_clip_fused/thresholds/adagc.py.
// gamma: [1, n_cols] (the column's EMA of clipped norms, +inf before its first record), count: the
// column's recorded steps (AdaGC's step count): the policy's threshold_state and threshold_count.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace tcf {

// torch.lerp's formula
template <typename R>
R lerp(R start, R end, R weight) {
  return std::abs(weight) < static_cast<R>(0.5) ? start + weight * (end - start)
                                                : end - (end - start) * (static_cast<R>(1) - weight);
}

// eta for column `col` with norm `norm` (total: the group's global norm); updates gamma and the
// count when `record`.  lam, one_minus_beta, eps and level (lambda_abs) are rounded to R as the
// reference's tensor arithmetic rounds its Python scalars.  norm64 / total64: the same norms in
// double, for the warm-up's eta when a float32 norm is past float32's range (+inf: n s would be
// inf * 0) and the double ones are finite: n s is then taken in double (an exploding gradient is
// clipped, docs/spec.md section 1; nothing is recorded, the norm not being finite).
template <typename R>
R adagc_record_and_threshold(R* gamma, int64_t* count, int64_t col, R norm, R total, double norm64, double total64,
                             bool record, R lam, R one_minus_beta, int64_t warmup, R eps, R level) {
  const int64_t cnt = *count;
  const R g = gamma[col];
  const bool warm = cnt == 0 || cnt + 1 < warmup;
  R eta, clipped, next;
  if (warm) {  // AdaGC's global clip, min(lambda_abs / (||g|| + eps), 1)
    const R q = level / (total + eps);
    const R s = q > static_cast<R>(1) ? static_cast<R>(1) : q;  // clamp(max=1) (NaN stays NaN)
    eta = norm * s;
    if ((std::isinf(norm) || std::isinf(total)) && std::isfinite(norm64) && std::isfinite(total64))
      eta = static_cast<R>(norm64 * std::min(static_cast<double>(level) / (total64 + static_cast<double>(eps)), 1.0));
    clipped = eta;
    next = std::isnan(clipped) ? clipped : std::min(g, clipped);
  } else {
    eta = lam * std::max(g, eps);
    clipped = std::isnan(norm) ? norm : std::min(norm, eta);
    next = lerp(g, clipped, one_minus_beta);
  }
  if (record) {
    gamma[col] = next;
    *count = cnt + 1;
  }
  return eta;
}

}  // namespace tcf
