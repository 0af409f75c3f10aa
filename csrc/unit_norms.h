// Unit scope (methods.Scope.UNIT, docs/spec.md): a tensor's output units are its slices along dim 0
// when it has two or more dimensions (matrix rows, conv filters), else the whole tensor is one unit
// (timm's unitwise_norm).  The fused kernels walk unit u of a tensor as the contiguous range
// [u * numel / units, (u + 1) * numel / units) of its memory, which units_contiguous checks; a chunk
// of the flat index space may straddle units and is walked as one segment per unit it touches.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

namespace tcf {

inline int64_t unit_count(const at::Tensor& p) { return p.dim() >= 2 ? p.size(0) : 1; }

// Whether each unit occupies its own contiguous range of memory: dim 0 is the outermost dimension
// (contiguous and channels_last tensors, not a transposed matrix); the tensor is dense (checked apart).
inline bool units_contiguous(const at::Tensor& p) {
  const int64_t units = unit_count(p);
  return units <= 1 || p.numel() == 0 || p.stride(0) == p.numel() / units;
}

// The units touched by the range [start, start + len) (len > 0) of a tensor whose units hold
// unit_len > 0 elements each.
inline int64_t first_unit(int64_t start, int64_t unit_len) { return start / unit_len; }
inline int64_t segment_count(int64_t start, int64_t len, int64_t unit_len) {
  return (start + len - 1) / unit_len - start / unit_len + 1;
}

// f(j, unit, seg_start, seg_len) for the j-th piece of [start, start + len) that lies in one unit,
// in memory order.
template <typename F>
void for_each_segment(int64_t start, int64_t len, int64_t unit_len, F&& f) {
  const int64_t end = start + len;
  int64_t unit = start / unit_len;
  for (int64_t j = 0, at = start; at < end; ++j, ++unit) {
    const int64_t stop = std::min(end, (unit + 1) * unit_len);
    f(j, unit, at, stop - at);
    at = stop;
  }
}

}  // namespace tcf
