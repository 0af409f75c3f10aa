// Per-step refresh of a param group's gradient pointers for the Triton plan (see grad_pointers.cpp).
#pragma once

#include <torch/extension.h>

#include <vector>

int64_t refresh_grad_pointers(const std::vector<at::Tensor>& params, const at::Tensor& has_grad,
                              const at::Tensor& param_ptrs, at::Tensor grad_ptrs);
