"""Update rules as data (issue 19 item 4): what each rule keeps per parameter, by torch.optim's state
keys, and where the backends find it; the optimizers collect it generically
(:meth:`ClippedOptimizer._rule_state`), check it in checkpoints and cast it with its parameter.

* SGD (``torch.optim.SGD``): ``momentum_buffer`` (with momentum), the backends' first moment m;
* AdamW (``torch.optim.AdamW``): ``exp_avg`` (m), ``exp_avg_sq`` (v), with amsgrad ``max_exp_avg_sq``
  (v_max), and a float32 ``step`` per parameter (0-d views of one device tensor of the group).

A new elementwise rule is: its code in ``methods.UPDATE_CODES``, its settings record in ``config.py``,
a rule here, and its arithmetic in each backend (the reference's module, a ``csrc/*_update.h`` header,
a ``kernels/*_math.py`` function), each reading the GroupTensors fields named here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Tuple


@dataclass(frozen=True)
class StateTensor:
    """One per-parameter state tensor of the parameter's shape: its ``optimizer.state`` key and the
    GroupTensors field that holds the group's list of them."""

    key: str
    field: str


@dataclass(frozen=True)
class UpdateRule:
    """An update rule's per-parameter state: ``tensors(update settings)`` (what this group keeps, in
    order), ``all_keys`` (every key the rule may keep: checked in loaded checkpoints) and whether it
    keeps a per-parameter ``step`` count (AdamW)."""

    name: str
    tensors: Callable[[object], Tuple[StateTensor, ...]]
    all_keys: Tuple[str, ...]
    step_counts: bool = False


MOMENTUM = StateTensor("momentum_buffer", "first_moments")
EXP_AVG = StateTensor("exp_avg", "first_moments")
EXP_AVG_SQ = StateTensor("exp_avg_sq", "exp_avg_sqs")
MAX_EXP_AVG_SQ = StateTensor("max_exp_avg_sq", "max_exp_avg_sqs")

SGD_RULE = UpdateRule("sgd", lambda update: (MOMENTUM,) if update.momentum != 0 else (), ("momentum_buffer",))
ADAMW_RULE = UpdateRule(
    "adamw", lambda update: (EXP_AVG, EXP_AVG_SQ) + ((MAX_EXP_AVG_SQ,) if update.amsgrad else ()),
    ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), step_counts=True)

__all__ = ["ADAMW_RULE", "SGD_RULE", "StateTensor", "UpdateRule"]
