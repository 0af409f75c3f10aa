"""Validated settings of one param group, and the tensors one step works on.

``GroupConfig.from_group`` is the single place where a param group's settings are
checked and turned into data; every backend takes a ``GroupConfig`` and a
``GroupTensors`` and never looks at strings again.
"""

from __future__ import annotations

import contextlib
import enum
import math
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple, Union

import torch

from .methods import (RANDOMIZATION_CODES, SCOPE_CODES, THRESHOLD_CODES, UPDATE_CODES, ClipMethod, Scope, Threshold,
                      default_level, parse_method)


class ClipPoint(str, enum.Enum):
    """Where the scales are taken: on the gradient (docs/spec.md section 3) or on the final update."""

    GRAD = "grad"
    UPDATE = "update"


class NonFinite(str, enum.Enum):
    """What a step whose gradients hold inf or NaN does."""

    SKIP = "skip"  # leave the group untouched and count the skip
    RAISE = "raise"  # FloatingPointError, nothing modified (costs a host sync)
    APPLY = "apply"  # apply the update as torch.optim.SGD would


#: Statistic names, in the order of the ``stats`` tensor of each group.
STAT_NAMES = ("norm", "threshold", "clipped_fraction", "skipped")

#: Philox index offset of the stochastic-rounding draws (docs/spec.md section 2): the element at
#: position i of the group's flat layout draws the four words of Philox at counter SR_INDEX + i
#: (``tl.randint4x``) and rounds its parameter with word 0, its momentum buffer with word 1;
#: clipping draws use counters below 2**40.
SR_INDEX = 2**40

#: ZClip's settings (the zclip package's ZClip(alpha, z_thresh, warmup_steps) defaults) and its eps
#: in the z-score (ZClip's eps=1e-6): z = (||g|| - mu) / (sigma + ZCLIP_EPS)
ZCLIP_DEFAULTS = dict(zclip_alpha=0.97, zclip_z=2.5, zclip_warmup=25)
ZCLIP_EPS = 1e-6

#: AdaGC's settings (pytorch-optimizer 4.1.0's AdaGC(lambda_rel, beta, warmup_steps) defaults) and
#: its eps (AdaGC's default eps=1e-8, which also floors the norms and the EMA): the threshold of
#: the relative phase is adagc_lambda * max(gamma, ADAGC_EPS), the warm-up clips at
#: clipping_level / (||g||_global + ADAGC_EPS)
ADAGC_DEFAULTS = dict(adagc_lambda=1.05, adagc_beta=0.98, adagc_warmup=100)
ADAGC_EPS = 1e-8

#: AGC's floor of the weight norm (timm's adaptive_clip_grad eps): the relative threshold is
#: clipping_level * max(||w||, agc_eps)
AGC_DEFAULTS = dict(agc_eps=1e-3)


def _choice(enum_cls, value, name: str):
    try:
        return enum_cls(value)
    except ValueError:
        valid = ", ".join(repr(e.value) for e in enum_cls)
        raise ValueError(f"Invalid {name} value: {value!r}; valid choices are {valid}") from None


def _tensor_value(value: torch.Tensor, name: str, what: str) -> float:
    """The value of a one-element floating-point tensor setting (``what``: "lr", "beta"), read once
    when the setting is made (construction, add_param_group, load_state_dict, a new value set)."""
    if value.numel() != 1:
        raise ValueError(f"Invalid {name}: Tensor {what} must be 1-element (a tensor {what} must hold one element), "
                         f"got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise ValueError(f"Invalid {name}: a tensor {what} must be floating point, got dtype {value.dtype}")
    return float(value)


def _number(value, name: str, allow_tensor: bool = False) -> float:
    if allow_tensor and isinstance(value, torch.Tensor):
        held = _tensor_value(value, name, "lr")
        if not math.isfinite(held) or held < 0:
            raise ValueError(f"Invalid {name}: the tensor lr holds {held}; expected a finite value >= 0 (during "
                             "step(), such a value makes the step skip, as a non-finite gradient does)")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Invalid {name} value: {value!r}; expected a number")
    if not math.isfinite(value):
        raise ValueError(f"Invalid {name} value: {value!r}; expected a finite number")
    return float(value)


_REQUIRED = object()


def _flag(group: dict, name: str, default=_REQUIRED, allow_none: bool = False) -> Optional[bool]:
    """A boolean setting, which must be True or False (or None where ``allow_none``): torch.optim
    would take any truthy value (``maximize="no"`` maximizes).  Without ``default`` the key is required."""
    value = group[name] if default is _REQUIRED else group.get(name, default)
    if isinstance(value, bool) or (allow_none and value is None):
        return value
    expected = "None, True or False" if allow_none else "True or False"
    raise TypeError(f"Invalid {name} value: {value!r}; expected {expected}")


#: torch.optim's implementation switches kept in param groups, and their defaults (None: unset, as
#: torch's); the backend is chosen once per optimizer (backends/dispatch.py): here, per group, their type.
SWITCHES = dict(foreach=None, fused=None, differentiable=False, capturable=False)


def _check_switches(group: dict, names) -> None:
    for name in names:
        _flag(group, name, default=SWITCHES[name], allow_none=SWITCHES[name] is None)


@contextlib.contextmanager
def naming_group(index: int) -> Iterator[None]:
    """Name the param group in the ValueError / TypeError of its settings: ``from_group`` sees the
    group's dict only, the optimizer knows its index (``with naming_group(i): cfg = from_group(g)``)."""
    try:
        yield
    except (ValueError, TypeError) as err:
        if type(err) not in (ValueError, TypeError) or len(err.args) != 1 or "param group" in str(err):
            raise
        raise type(err)(f"param group {index}: {err}").with_traceback(err.__traceback__) from None


def settings_key(group: dict, skip=("params",)) -> tuple:
    """What identifies a param group's settings between steps (the optimizers re-validate a group when
    it changes): each value, a tensor by identity (a tensor lr changed in place is read by the kernels
    on the device), and a tensor inside a tuple or list (tensor betas, read into the config as floats)
    also by its version counter, so that one changed in place is read again.  Builds no tensor
    comparison (no host sync)."""
    return tuple((k, ("tensor", id(v)) if isinstance(v, torch.Tensor) else
                  _sequence_key(v) if type(v) in _SEQUENCES else v)
                 for k, v in group.items() if k not in skip)


_SEQUENCES = (tuple, list)


def _sequence_key(values):
    if not any(isinstance(v, torch.Tensor) for v in values):
        return values
    return (type(values).__name__,) + tuple((id(v), _version(v)) if isinstance(v, torch.Tensor) else v for v in values)


def _version(tensor: torch.Tensor) -> int:
    try:
        return tensor._version
    except RuntimeError:  # an inference-mode tensor has no version counter
        return -1


@dataclass(frozen=True)
class ClipConfig:
    """What to clip and how: the method (scope x threshold x randomization) and its settings.

    The threshold policy's state (for ``auto``: a history of norms per scope column) is described
    by ``method.threshold`` (see ``methods.THRESHOLD_STATE``) and kept by ``state.py``."""

    method: ClipMethod
    level: float
    beta: float
    p_autoclip: float
    autoclip_history: Optional[int]
    clip_point: ClipPoint
    zclip_alpha: float = ZCLIP_DEFAULTS["zclip_alpha"]  # ZClip's EMA factor, 0 < alpha < 1
    zclip_z: float = ZCLIP_DEFAULTS["zclip_z"]  # ZClip's z threshold, > 0
    zclip_warmup: int = ZCLIP_DEFAULTS["zclip_warmup"]  # ZClip's warm-up steps, >= 0 (0 records one norm, as 1)
    adagc_lambda: float = ADAGC_DEFAULTS["adagc_lambda"]  # AdaGC's lambda_rel, > 0
    adagc_beta: float = ADAGC_DEFAULTS["adagc_beta"]  # AdaGC's EMA factor, 0 <= beta < 1
    adagc_warmup: int = ADAGC_DEFAULTS["adagc_warmup"]  # AdaGC's warmup_steps, >= 0 (the first step always warms up)
    agc_eps: float = AGC_DEFAULTS["agc_eps"]  # AGC's weight-norm floor, >= 0

    @classmethod
    def from_group(cls, group: dict) -> "ClipConfig":
        """Validate a param group's clipping settings; raises ValueError / TypeError naming the bad value."""
        method = parse_method(group["clipping_type"])
        level = group["clipping_level"]
        if level is None:  # zscore: no cap (ZClip's max_grad_norm=None)
            level = math.inf if method.threshold is Threshold.ZSCORE else default_level(method)
        else:
            level = _number(level, "clipping_level")
        if level < 0.0:
            raise ValueError(f"Invalid clipping_level value: {level}; expected clipping_level >= 0")
        beta = _number(group["beta"], "beta")
        if not 0.0 < beta < 1.0:
            raise ValueError(f"Invalid beta value: {beta}; expected 0 < beta < 1")
        p_autoclip = _number(group["p_autoclip"], "p_autoclip")
        if not 0.0 < p_autoclip <= 1.0:
            raise ValueError(f"Invalid p_autoclip value: {p_autoclip}; expected 0 < p_autoclip <= 1")
        history = group["autoclip_history"]
        if history is not None and (isinstance(history, bool) or not isinstance(history, int) or history < 1):
            raise ValueError(f"Invalid autoclip_history value: {history!r}; expected None or an int >= 1")
        # groups saved before these settings existed (and ClippedSSTM's) take the defaults
        zclip_alpha = _number(group.get("zclip_alpha", ZCLIP_DEFAULTS["zclip_alpha"]), "zclip_alpha")
        if not 0.0 < zclip_alpha < 1.0:
            raise ValueError(f"Invalid zclip_alpha value: {zclip_alpha}; expected 0 < zclip_alpha < 1")
        zclip_z = _number(group.get("zclip_z", ZCLIP_DEFAULTS["zclip_z"]), "zclip_z")
        if not zclip_z > 0.0:
            raise ValueError(f"Invalid zclip_z value: {zclip_z}; expected zclip_z > 0")
        zclip_warmup = group.get("zclip_warmup", ZCLIP_DEFAULTS["zclip_warmup"])
        if isinstance(zclip_warmup, bool) or not isinstance(zclip_warmup, int) or zclip_warmup < 0:
            raise ValueError(f"Invalid zclip_warmup value: {zclip_warmup!r}; expected an int >= 0")
        adagc_lambda = _number(group.get("adagc_lambda", ADAGC_DEFAULTS["adagc_lambda"]), "adagc_lambda")
        if not 0.0 < adagc_lambda < math.inf:
            raise ValueError(f"Invalid adagc_lambda value: {adagc_lambda}; expected a finite adagc_lambda > 0")
        adagc_beta = _number(group.get("adagc_beta", ADAGC_DEFAULTS["adagc_beta"]), "adagc_beta")
        if not 0.0 <= adagc_beta < 1.0:
            raise ValueError(f"Invalid adagc_beta value: {adagc_beta}; expected 0 <= adagc_beta < 1")
        adagc_warmup = group.get("adagc_warmup", ADAGC_DEFAULTS["adagc_warmup"])
        if isinstance(adagc_warmup, bool) or not isinstance(adagc_warmup, int) or adagc_warmup < 0:
            raise ValueError(f"Invalid adagc_warmup value: {adagc_warmup!r}; expected an int >= 0")
        agc_eps = _number(group.get("agc_eps", AGC_DEFAULTS["agc_eps"]), "agc_eps")
        if not agc_eps >= 0.0:
            raise ValueError(f"Invalid agc_eps value: {agc_eps}; expected agc_eps >= 0")
        clip_point = _choice(ClipPoint, group["clip_point"], "clip_point")
        if clip_point is ClipPoint.UPDATE and (method.scope is Scope.UNIT or method.threshold is Threshold.RELATIVE):
            raise ValueError(f"Invalid clip_point value: 'update' with clipping method {method.name!r}: unit scope and "
                             "the relative threshold (AGC) clip the gradient against the weights; use clip_point='grad'")
        if method.threshold is Threshold.EMA_RELATIVE and not level > 0.0:
            raise ValueError(f"Invalid clipping_level value: {level}; the ema_relative threshold (AdaGC) clips at "
                             "clipping_level during its warm-up (AdaGC's lambda_abs) and needs clipping_level > 0")
        return cls(method=method, level=level, beta=beta, p_autoclip=p_autoclip, autoclip_history=history,
                   clip_point=clip_point, zclip_alpha=zclip_alpha,
                   zclip_z=zclip_z, zclip_warmup=zclip_warmup, adagc_lambda=adagc_lambda, adagc_beta=adagc_beta,
                   adagc_warmup=adagc_warmup, agc_eps=agc_eps)

    @property
    def zclip_rows(self) -> int:
        """Rows of a zscore state column: the EMA mean, the EMA variance, then the warm-up records
        (at least one: ZClip with warmup_steps=0 still records one norm before its EMAs start)."""
        return 2 + max(self.zclip_warmup, 1)

    @property
    def scope_code(self) -> int:
        return SCOPE_CODES[self.method.scope]

    @property
    def threshold_code(self) -> int:
        return THRESHOLD_CODES[self.method.threshold]

    @property
    def randomization_code(self) -> int:
        return RANDOMIZATION_CODES[self.method.randomization]


@dataclass(frozen=True)
class SGDUpdate:
    """The SGD update rule applied after clipping (torch.optim.SGD's settings)."""

    lr: Union[float, torch.Tensor]
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    maximize: bool
    stochastic_rounding: bool = False  # bf16 / fp16 p and m rounded stochastically (docs/spec.md section 3.1)

    code = UPDATE_CODES["sgd"]

    @classmethod
    def from_group(cls, group: dict) -> "SGDUpdate":
        """Validate a param group's SGD settings; raises ValueError / TypeError naming the bad value."""
        lr = _number(group["lr"], "learning rate", allow_tensor=True)
        if not isinstance(lr, torch.Tensor) and lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}; expected lr >= 0")
        momentum = _number(group["momentum"], "momentum")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}; expected momentum >= 0")
        dampening = _number(group["dampening"], "dampening")
        weight_decay = _number(group["weight_decay"], "weight_decay")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}; expected weight_decay >= 0")
        nesterov = _flag(group, "nesterov")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(
                f"Invalid nesterov setting: nesterov momentum requires momentum > 0 and zero "
                f"dampening, got momentum={momentum}, dampening={dampening}"
            )
        maximize = _flag(group, "maximize")
        stochastic_rounding = _flag(group, "stochastic_rounding", default=False)
        _check_switches(group, ("foreach", "fused", "differentiable"))
        return cls(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                   maximize=maximize, stochastic_rounding=stochastic_rounding)


@dataclass(frozen=True)
class AdamWUpdate:
    """The AdamW update rule applied after clipping (torch.optim.AdamW's settings; Loshchilov & Hutter,
    "Decoupled Weight Decay Regularization", ICLR 2019).  Per element, with g the clipped gradient and
    t the parameter's step count after this step:

        p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;  (amsgrad: vmax <- max(vmax, v))
        p <- p - lr / (1 - b1^t) * m / (sqrt(v or vmax) / sqrt(1 - b2^t) + eps)
    """

    lr: Union[float, torch.Tensor]
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool
    stochastic_rounding: bool = False  # not offered with AdamW

    code = UPDATE_CODES["adamw"]

    @classmethod
    def from_group(cls, group: dict) -> "AdamWUpdate":
        """Validate a param group's AdamW settings (as torch.optim.AdamW); raises ValueError / TypeError
        naming the bad value."""
        lr = _number(group["lr"], "learning rate", allow_tensor=True)
        if not isinstance(lr, torch.Tensor) and lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}; expected lr >= 0")
        beta1, beta2 = _betas(group["betas"])
        eps = _number(group["eps"], "epsilon value")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}; expected eps >= 0")
        weight_decay = _number(group["weight_decay"], "weight_decay")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}; expected weight_decay >= 0")
        amsgrad, maximize = _flag(group, "amsgrad"), _flag(group, "maximize")
        _check_switches(group, ("foreach", "fused", "differentiable", "capturable"))
        return cls(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                   maximize=maximize)


def _betas(betas) -> Tuple[float, float]:
    """AdamW's (beta1, beta2), each a number or a one-element floating-point tensor, with 0 <= beta < 1
    (as torch.optim.AdamW, which reads a tensor beta at each step).  A tensor's value is read here, when
    the setting is made and again when the tensor is changed in place (``settings_key``; one host sync
    then for a tensor on an accelerator), and the step uses it as a float."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas value: {betas!r}; expected a pair (beta1, beta2)")
    values = []
    for i, b in enumerate(betas):
        name = f"beta parameter at index {i}"
        value = _tensor_value(b, name, "beta") if isinstance(b, torch.Tensor) else _number(b, name)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {value}; expected 0 <= beta < 1")
        values.append(value)
    return values[0], values[1]


@dataclass(frozen=True)
class ClipOnly:
    """The functional API's update rule: the clipped gradient is written back, nothing else moves
    (the SGD settings read by the backends are those of no update)."""

    lr: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False
    stochastic_rounding: bool = False

    code = UPDATE_CODES["clip_only"]


@dataclass(frozen=True)
class GroupConfig:
    """Everything a backend needs to know about a param group's settings: what to clip
    (``clip``), the update rule applied after it (``update``) and the non-finite policy."""

    clip: ClipConfig
    update: Union[SGDUpdate, AdamWUpdate, ClipOnly]
    nonfinite: NonFinite

    @classmethod
    def from_group(cls, group: dict) -> "GroupConfig":
        """Validate a ClippedSGD param group's settings; raises ValueError / TypeError naming the bad value."""
        update = SGDUpdate.from_group(group)
        clip = ClipConfig.from_group(group)
        return cls(clip=clip, update=update, nonfinite=_choice(NonFinite, group["nonfinite"], "nonfinite"))

    @classmethod
    def from_adamw_group(cls, group: dict) -> "GroupConfig":
        """Validate a ClippedAdamW param group's settings; raises ValueError / TypeError naming the bad value."""
        update = AdamWUpdate.from_group(group)
        clip = ClipConfig.from_group(group)
        if clip.clip_point is not ClipPoint.GRAD:
            raise ValueError(f"Invalid clip_point value: {clip.clip_point.value!r}; ClippedAdamW clips the gradient "
                             "before the moments (clip_point='grad')")
        return cls(clip=clip, update=update, nonfinite=_choice(NonFinite, group["nonfinite"], "nonfinite"))

    @property
    def needs_norms(self) -> bool:
        """Whether a norm pass over the gradients is needed at all."""
        method = self.clip.method
        return (method.clips and method.scope.value != "coordinate") or self.nonfinite is not NonFinite.APPLY


@dataclass
class GroupTensors:
    """The tensors of one param group's step, all on one device.

    ``columns[i]`` is the position of ``params[i]`` in its param group (the index of
    its per-tensor history column and of its layer-scope random draw), and
    ``offsets[i]`` the position of its first element when all of the group's
    parameters are laid end to end (the index of coordinate-scope draws; for a shard of a
    sharded parameter, the position of the shard's first element in the unsharded group).
    """

    params: List[torch.Tensor]
    grads: Optional[List[torch.Tensor]]  # None: read from ``grad_owners`` on first use
    # the first moment m of the update rule (optim/update_rules.py): SGD's momentum buffers, AdamW's exp_avg;
    # None without one (SGD without momentum, the functional API)
    first_moments: Optional[List[torch.Tensor]]
    columns: List[int]
    offsets: List[int]
    seed: int
    step: torch.Tensor  # int64 [], number of step() calls before this one
    history: Optional[torch.Tensor]  # float32 [capacity, n_columns] (1 column at global scope)
    history_count: Optional[torch.Tensor]  # int64 [n_columns], norms recorded so far
    momentum_ready: torch.Tensor  # bool [n_params in group]
    stats: torch.Tensor  # float32 [len(STAT_NAMES)]
    skipped: torch.Tensor  # int64 [], steps skipped so far
    grad_scale: Optional[torch.Tensor] = None
    found_inf: Optional[torch.Tensor] = None
    grad_owners: Optional[List[torch.Tensor]] = None  # the tensors whose ``.grad`` are the gradients
    grad_ptrs: Optional[torch.Tensor] = None  # int64 [T] (CPU): the gradients' data pointers
    grad_ptrs_changed: bool = True  # whether grad_ptrs differ from the previous step's
    backend_cache: Optional[dict] = None  # the group's slot for a backend's own cached state
    history_sorted: Optional[torch.Tensor] = None  # float32 [n_columns, capacity]: the history ascending, +inf padded
    # zscore threshold (ZClip): float32 [2 + W, n_columns] (float64 for float64 groups): row 0 the EMA
    # mean, row 1 the EMA variance, rows 2.. the W warm-up norms; and int64 [n_columns], the warm-up
    # norms recorded so far (at most W: the EMAs start when it reaches W and run from the next step)
    zclip: Optional[torch.Tensor] = None
    zclip_count: Optional[torch.Tensor] = None
    # ema_relative threshold (AdaGC): float32 [1, n_columns] (float64 for float64 groups): gamma, the
    # EMA of the column's clipped norms (+inf before its first record); and int64 [n_columns], the
    # steps recorded so far (the warm-up is over once count >= 1 and count + 1 >= adagc_warmup)
    adagc: Optional[torch.Tensor] = None
    adagc_count: Optional[torch.Tensor] = None
    # float32 [T + 1]: per-tensor norms then the global norm, already reduced across ranks (a sharded
    # group, torch_clip_fused/distributed/dtensor.py): the backend skips its norm stage and uses them;
    # a NaN global norm marks a non-finite gradient on some rank (the step is skipped unless
    # nonfinite="apply")
    given_norms: Optional[torch.Tensor] = None
    # AdamW (update code 2): ``first_moments`` hold exp_avg; these the second moments, amsgrad's maxima
    # (amsgrad only) and float32 [n_params in group], by column, the AdamW steps each parameter has taken
    # (torch's per-parameter ``state["step"]`` are 0-d views of it; +1 where a step is not skipped)
    exp_avg_sqs: Optional[List[torch.Tensor]] = None
    max_exp_avg_sqs: Optional[List[torch.Tensor]] = None
    adam_steps: Optional[torch.Tensor] = None
    # unit scope: per tensor of the step, the position of its first unit among the group's units laid end to
    # end in group order (every parameter of the group counted); the Philox index base of its units
    unit_offsets: Optional[List[int]] = None

    @property
    def device(self) -> torch.device:
        return self.params[0].device


def _grads(self: GroupTensors) -> List[torch.Tensor]:
    if self._grads is None:
        self._grads = [p.grad for p in self.grad_owners]
    return self._grads


def _set_grads(self: GroupTensors, grads: Optional[List[torch.Tensor]]) -> None:
    self._grads = grads


# A backend that needs only ``grad_ptrs`` (Triton) never pays for the Python list of gradients.
GroupTensors.grads = property(_grads, _set_grads)
