// AutoClip's sorted history (torch_clip_fused/thresholds/autoclip.py gives the math): a ring
// [capacity, columns] in the order recorded (the policy's threshold_state) and, per column, a row
// [capacity] of the recorded norms ascending with +inf padding (threshold_sorted).  Recording moves
// only the positions between where the leaving norm was and where the new one goes (std::lower_bound
// + one memmove); the quantile is one read.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace tcf {

// Record `norm` in column `col` (when `record`), then return the column's nearest-rank
// p-quantile, the current norm included (the norm itself while the column is empty).
// ring: R [capacity * n_cols]; sorted: R [n_cols * capacity]; count: the column's.  R is float32,
// or float64 for float64 groups.
template <typename R>
R autoclip_record_and_threshold(R* ring, R* sorted, int64_t* count, int64_t capacity, int64_t n_cols, int64_t col,
                                R norm, bool record, double p) {
  R* row = sorted + col * capacity;
  if (record) {
    const int64_t slot = *count % capacity;
    const bool full = *count >= capacity;
    const R old = ring[slot * n_cols + col];
    const int64_t n = std::min(*count, capacity);
    int64_t a = full ? std::lower_bound(row, row + n, old) - row : n;
    a = std::min(a, capacity - 1);  // (a corrupt ring whose norm is not in the row stays in bounds)
    int64_t b = (std::lower_bound(row, row + n, norm) - row) - ((full && old < norm) ? 1 : 0);
    b = std::max<int64_t>(std::min(b, capacity - 1), 0);
    if (a <= b) {
      std::memmove(row + a, row + a + 1, static_cast<size_t>(b - a) * sizeof(R));
    } else {
      std::memmove(row + b + 1, row + b, static_cast<size_t>(a - b) * sizeof(R));
    }
    row[b] = norm;
    ring[slot * n_cols + col] = norm;
    *count += 1;
  }
  if (*count == 0) return norm;
  const int64_t n = std::min(*count, capacity);
  int64_t k = static_cast<int64_t>(std::ceil(p * static_cast<double>(n)));
  k = std::min(std::max<int64_t>(k, 1), n);
  return row[k - 1];
}

}  // namespace tcf
