// ZClip's threshold (Kumar et al., 2025) for one scope column, as the zclip==1.0.0 package computes it
// in every mode and option; the math and its order are those of torch_clip_fused/thresholds/zclip.py.
// state: [2 + W, n_cols] row-major (row 0 EMA mean, row 1 EMA variance, rows 2.. the W warm-up norms),
// count: the column's warm-up records (<= W): the policy's threshold_state and threshold_count.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace tcf {

// ZClip's clip value on a spike (kernel_params[3], thresholds/zclip.py zclip_variant): zscore mode with
// clip_option "adaptive_scaling" or "mean", percentile mode.
constexpr int64_t kZclipAdaptiveScaling = 0, kZclipMean = 1, kZclipPercentile = 2;

// eta for column `col` with norm `norm`; records it (warm-up) or updates the EMAs when `record`
// (not on a spike with skip_on_spike).  After the warm-up, sigma = sqrt(var) and a spike's clip value c:
// zscore mode, z = (norm - mu) / (sigma + eps) > z_thresh, c = (mu + z_thresh sigma / (z / z_thresh))
// clip_factor (adaptive_scaling) or mu (mean); percentile mode, norm > c = mu + z_thresh sigma.
// alpha, one_minus_alpha, z_thresh, eps, level (the cap; inf: none) and clip_factor are rounded to R
// as the reference's tensor arithmetic rounds its Python scalars.
template <typename R>
R zscore_record_and_threshold(R* state, int64_t* count, int64_t rows, int64_t n_cols, int64_t col, R norm,
                              bool record, R alpha, R one_minus_alpha, R z_thresh, R eps, R level,
                              int64_t variant, R clip_factor, bool skip_on_spike) {
  const int64_t w = rows - 2;
  R* mean = state + col;
  R* var = state + n_cols + col;
  R* records = state + 2 * n_cols + col;
  const int64_t cnt = *count;
  if (cnt < w) {  // warm-up: record; the W-th record starts the EMAs (biased mean and variance)
    if (record) {
      records[cnt * n_cols] = norm;
      *count = cnt + 1;
      if (cnt + 1 == w) {
        R sum = 0;
        for (int64_t i = 0; i < w; ++i) sum += records[i * n_cols];
        const R m = sum / static_cast<R>(w);
        R sq = 0;
        for (int64_t i = 0; i < w; ++i) {
          const R d = records[i * n_cols] - m;
          sq += d * d;
        }
        *mean = m;
        *var = sq / static_cast<R>(w);
      }
    }
    return std::min(norm, level);
  }
  const R mu = *mean, v = *var;
  const R std = std::sqrt(v);
  bool spike;
  R clip_value;
  if (variant == kZclipPercentile) {
    clip_value = mu + z_thresh * std;
    spike = norm > clip_value;
  } else {
    const R z = (norm - mu) / (std + eps);
    spike = z > z_thresh;
    clip_value = variant == kZclipMean ? mu : (mu + (z_thresh * std) / (z / z_thresh)) * clip_factor;
  }
  const R adaptive = spike ? clip_value : norm;
  if (record && !(skip_on_spike && spike)) {
    const R next_mean = alpha * mu + one_minus_alpha * adaptive;
    const R d = adaptive - next_mean;
    *mean = next_mean;
    *var = alpha * v + one_minus_alpha * (d * d);
  }
  return std::isnan(adaptive) ? adaptive : std::min(adaptive, level);
}

}  // namespace tcf
