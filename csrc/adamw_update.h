// The AdamW update rule (update code 2, docs/spec.md) for one element or one vector of lanes, in the
// order of torch.optim.AdamW(foreach=False)'s single-tensor loop (torch/optim/adam.py):
//   param.mul_(1 - lr * wd); exp_avg.lerp_(g, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(g, g, 1 - beta2);
//   (amsgrad) torch.maximum(max_exp_avg_sq, exp_avg_sq); denom = sqrt(v) / sqrt(bc2) + eps;
//   param.addcdiv_(exp_avg, denom, -lr / bc1)
// with torch's lerp (ATen/native/cpu/Lerp.h: an fma from the nearer end) and its scalar arguments rounded
// to the arithmetic type once.  X: at::vec::Vectorized<T> or T (T = float, or double for float64 tensors).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cmath>

namespace tcf {

// The step's AdamW constants of one tensor in the arithmetic type T (bias corrections from its step
// count t = adam_steps[column] + 1, computed in double as torch computes them in Python).
template <typename T>
struct AdamConsts {
  T decay = 1;          // 1 - lr * weight_decay
  T w1 = 0;             // lerp weight 1 - beta1 (w1 - 1 when the lerp starts from g)
  bool from_m = true;   // lerp from m (1 - beta1 < 0.5) or from g
  T beta2 = 0, omb2 = 0;  // beta2, 1 - beta2
  T bc2_sqrt = 1;       // sqrt(1 - beta2**t)
  T eps = 0;
  T neg_step = 0;       // -lr / (1 - beta1**t)
  bool has_wd = false, amsgrad = false;
  AdamConsts() = default;
  AdamConsts(double lr, double weight_decay, double beta1, double beta2, double eps_, bool amsgrad_, double t)
      : decay(static_cast<T>(1.0 - lr * weight_decay)),
        w1(static_cast<T>(1.0 - beta1)),
        from_m(std::abs(1.0 - beta1) < 0.5),
        beta2(static_cast<T>(beta2)),
        omb2(static_cast<T>(1.0 - beta2)),
        bc2_sqrt(static_cast<T>(std::sqrt(1.0 - std::pow(beta2, t)))),
        eps(static_cast<T>(eps_)),
        neg_step(static_cast<T>(-(lr / (1.0 - std::pow(beta1, t))))),
        has_wd(weight_decay != 0),
        amsgrad(amsgrad_) {
    if (!from_m) w1 = w1 - static_cast<T>(1);  // torch's lerp: end + (weight - 1) * (end - start)
  }
};

template <typename T>
at::vec::Vectorized<T> adam_fma(const at::vec::Vectorized<T>& a, const at::vec::Vectorized<T>& b,
                                const at::vec::Vectorized<T>& c) {
  return at::vec::fmadd(a, b, c);
}
template <typename T>
T adam_fma(T a, T b, T c) {
  return std::fma(a, b, c);
}
template <typename T>
at::vec::Vectorized<T> adam_sqrt(const at::vec::Vectorized<T>& x) {
  return x.sqrt();
}
template <typename T>
T adam_sqrt(T x) {
  return std::sqrt(x);
}
// torch.maximum: NaN if either is NaN
template <typename T>
at::vec::Vectorized<T> adam_max(const at::vec::Vectorized<T>& a, const at::vec::Vectorized<T>& b) {
  return at::vec::maximum(a, b);
}
template <typename T>
T adam_max(T a, T b) {
  return std::isnan(a) ? a : (a > b ? a : b);
}

// One AdamW update of (p, m, v[, vmax]) with the clipped gradient g; returns the new parameter and
// writes the new moments (and amsgrad's maximum) through the pointers.
template <typename X, typename T>
X adamw_update(const AdamConsts<T>& k, X g, X p, X m, X v, X vmax, X* m_out, X* v_out, X* vmax_out) {
  const X p1 = k.has_wd ? p * X(k.decay) : p;  // exactly p without weight decay (no 0 * inf)
  const X mn = k.from_m ? adam_fma(X(k.w1), g - m, m) : adam_fma(X(k.w1), g - m, g);
  const X vn = v * X(k.beta2) + X(k.omb2) * g * g;
  X vhat = vn;
  if (k.amsgrad) {
    vhat = adam_max(vmax, vn);
    *vmax_out = vhat;
  }
  const X denom = adam_sqrt(vhat) / X(k.bc2_sqrt) + X(k.eps);
  *m_out = mn;
  *v_out = vn;
  return p1 + X(k.neg_step) * mn / denom;
}

}  // namespace tcf
