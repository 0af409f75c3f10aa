"""The AdamW update rule (update code 2) on flat workspace buffers: Loshchilov & Hutter, "Decoupled
Weight Decay Regularization", ICLR 2019, as torch.optim.AdamW computes it.

Per element, with g the clipped gradient (negated if maximize), lr the learning rate, wd the weight
decay and t = (steps taken by the tensor) + 1:

    p1    = p (1 - lr wd)                                  (p itself when wd = 0)
    m'    = beta1 m + (1 - beta1) g
    v'    = beta2 v + (1 - beta2) g^2
    vmax' = max(vmax, v')                                  (amsgrad)
    denom = sqrt(v_hat) / sqrt(1 - beta2^t) + eps          (v_hat = vmax' with amsgrad, else v')
    p'    = p1 - (lr / (1 - beta1^t)) m' / denom

Element-wise arithmetic in the segment's dtype (float32, or float64 for float64 tensors), with the
operations torch.optim.AdamW (foreach=False) uses: m' = lerp(m, g, 1 - beta1) and v' = addcmul(beta2 v,
g, g, 1 - beta2) (equal to the formulas above up to rounding; fused multiply-adds on CPU), so that a
float-lr step is bit-identical to torch's on CPU.  The per-tensor bias corrections are computed in
float64 from the step counts, on the device (no host synchronisation).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch


def bias_corrections(adam_steps: torch.Tensor, columns: torch.Tensor, lr: Union[float, torch.Tensor],
                     beta1: float, beta2: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per tensor of the step (columns ``columns`` of the float32 ``adam_steps``): the step count after this
    step t = steps + 1 (float32 [n]), the step size lr / (1 - beta1^t) (float64 [n], or in a tensor lr's
    dtype) and sqrt(1 - beta2^t) (float64 [n])."""
    t = adam_steps.index_select(0, columns) + 1
    t64 = t.to(torch.float64)
    bc1 = 1 - torch.pow(beta1, t64)
    bc2_sqrt = (1 - torch.pow(beta2, t64)).sqrt()
    if isinstance(lr, torch.Tensor):  # as torch: the step size in lr's dtype
        lr = lr.reshape(())
        return t, lr / bc1.to(lr.dtype), bc2_sqrt
    return t, lr / bc1, bc2_sqrt


def decay_factor(lr: Union[float, torch.Tensor], weight_decay: float):
    """1 - lr wd (None when wd = 0: p is not multiplied at all)."""
    if weight_decay == 0:
        return None
    return 1 - lr * weight_decay


def adamw_update(g: torch.Tensor, p: torch.Tensor, m: torch.Tensor, v: torch.Tensor, vmax: Optional[torch.Tensor],
                 step_size: torch.Tensor, bc2_sqrt: torch.Tensor, decay, update) -> Tuple[torch.Tensor, ...]:
    """One AdamW step on flat tensors of one arithmetic dtype (``step_size`` and ``bc2_sqrt`` already
    expanded per element, in that dtype; ``decay`` from :func:`decay_factor`; ``update`` the
    ``AdamWUpdate``).  Returns (p', m', v', vmax') (vmax' None without amsgrad); nothing is written."""
    p1 = p if decay is None else p * decay
    new_m = torch.lerp(m, g, 1 - update.beta1)
    new_v = torch.addcmul(v * update.beta2, g, g, value=1 - update.beta2)
    new_vmax = None
    v_hat = new_v
    if update.amsgrad:
        new_vmax = v_hat = torch.maximum(vmax, new_v)
    denom = v_hat.sqrt() / bc2_sqrt + update.eps
    new_p = p1 - step_size * new_m / denom
    return new_p, new_m, new_v, new_vmax
