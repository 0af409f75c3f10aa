// One call per step that re-reads a param group's gradients for a cached multi-tensor plan.
//
// A plan (chunk table, offsets, scratch) depends only on the parameters; autograd gives new
// gradient tensors every step (zero_grad(set_to_none=True)), so only their data pointers are
// re-read, here, with O(1) work per tensor and no Python loop.  The call also checks everything
// the plan assumed, so that a stale plan is never used:
//   * the same parameters have gradients (has_grad[j]),
//   * no parameter was reallocated (param_ptrs[j]),
//   * every gradient is a strided tensor of the parameter's dtype, device, sizes and strides
//     (the kernels walk gradient and parameter memory with the same offsets).
// Nothing here throws after the argument checks, and nothing runs in parallel.

#include "grad_pointers.h"

#include "layout.h"

// params: every parameter of the group (G); has_grad: uint8 [G], which of them the plan covers;
// param_ptrs: int64 [G], their data pointers when the plan was built; grad_ptrs: int64 [T], the
// covered gradients' pointers in group order, overwritten.
// Returns -1 when every check passes and no pointer changed, -2 when every check passes and
// some pointer changed, else the group index of the first parameter that fails a check.
int64_t refresh_grad_pointers(const std::vector<at::Tensor>& params, const at::Tensor& has_grad,
                              const at::Tensor& param_ptrs, at::Tensor grad_ptrs) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(has_grad.scalar_type() == at::kByte && has_grad.numel() == n && has_grad.is_contiguous(),
              "refresh_grad_pointers: has_grad must be a contiguous uint8 tensor of ", n, " elements");
  TORCH_CHECK(param_ptrs.scalar_type() == at::kLong && param_ptrs.numel() == n && param_ptrs.is_contiguous(),
              "refresh_grad_pointers: param_ptrs must be a contiguous int64 tensor of ", n, " elements");
  TORCH_CHECK(grad_ptrs.scalar_type() == at::kLong && grad_ptrs.is_contiguous() && grad_ptrs.device().is_cpu(),
              "refresh_grad_pointers: grad_ptrs must be a contiguous int64 CPU tensor");
  TORCH_CHECK(has_grad.device().is_cpu() && param_ptrs.device().is_cpu(),
              "refresh_grad_pointers: has_grad and param_ptrs must be CPU tensors");
  const uint8_t* expected = has_grad.data_ptr<uint8_t>();
  const int64_t* recorded = param_ptrs.data_ptr<int64_t>();
  int64_t* out = grad_ptrs.data_ptr<int64_t>();
  const int64_t capacity = grad_ptrs.numel();
  bool changed = false;
  int64_t k = 0;
  for (int64_t j = 0; j < n; ++j) {
    const at::Tensor& p = params[j];
    const at::Tensor& g = p.grad();
    if (g.defined() != (expected[j] != 0)) return j;
    if (reinterpret_cast<int64_t>(p.data_ptr()) != recorded[j]) return j;
    if (!g.defined()) continue;
    if (k >= capacity || g.layout() != at::kStrided || g.scalar_type() != p.scalar_type() ||
        g.device() != p.device() || !tcf::same_layout(p, g))
      return j;
    const int64_t ptr = reinterpret_cast<int64_t>(g.data_ptr());
    changed = changed || out[k] != ptr;
    out[k++] = ptr;
  }
  return changed ? -2 : -1;
}
