// Memory layouts the fused kernels accept (the Python side is torch_clip_fused/backends/layout.py).
#pragma once

#include <ATen/ATen.h>

namespace tcf {

// Same sizes and the same strides on every dimension longer than 1: the kernels walk both
// tensors' memory with the same offsets.
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

}  // namespace tcf
