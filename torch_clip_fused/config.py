"""Validated settings of one param group, and the tensors one step works on.

``GroupConfig.from_group`` is the single place where a param group's settings are
checked and turned into data; every backend takes a ``GroupConfig`` and a
``GroupTensors`` and never looks at strings again.
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple, Union

import torch

from .checks import choice, number, tensor_value
from .methods import (RANDOMIZATION_CODES, SCOPE_CODES, THRESHOLD_CODES, UPDATE_CODES, ClipMethod, Scope, default_level,
                      parse_method)
from .norm_type import describe, kind, parse_norm_type
from .skips import NO_SKIP, SkipConfig
from .thresholds import SETTINGS, ThresholdPolicy, ThresholdState, policy
from .thresholds.policy import SettingsByName


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
class ClipConfig(SettingsByName):
    """What to clip and how: the method (scope x threshold x randomization), its level, the
    randomization's beta, where the scales are taken, every threshold policy's settings
    (thresholds/: ``settings`` by name, read as attributes, e.g. ``clip.zclip_alpha``) and the norm
    (``norm_type`` p >= 1 or inf, norm_type.py: global and layer scope)."""

    method: ClipMethod
    level: float
    beta: float
    clip_point: ClipPoint
    settings: Tuple[Tuple[str, object], ...] = ()
    norm_type: float = 2.0

    @classmethod
    def from_group(cls, group: dict) -> "ClipConfig":
        """Validate a param group's clipping settings; raises ValueError / TypeError naming the bad value.
        A policy setting missing from the group (saved before it existed; ClippedSSTM's) takes its default."""
        method = parse_method(group["clipping_type"])
        owner = policy(method.threshold)
        level = group["clipping_level"]
        if level is None:
            level = owner.default_level if owner.default_level is not None else default_level(method)
        else:
            level = number(level, "clipping_level")
        if level < 0.0:
            raise ValueError(f"Invalid clipping_level value: {level}; expected clipping_level >= 0")
        beta = number(group["beta"], "beta")
        if not 0.0 < beta < 1.0:
            raise ValueError(f"Invalid beta value: {beta}; expected 0 < beta < 1")
        settings = tuple((name, s.parse(group.get(name, s.default))) for name, s in SETTINGS.items())
        clip_point = choice(ClipPoint, group["clip_point"], "clip_point")
        if clip_point is ClipPoint.UPDATE and (method.scope is Scope.UNIT or owner.needs_weights):
            raise ValueError(f"Invalid clip_point value: 'update' with clipping method {method.name!r}: unit scope and "
                             "the relative threshold (AGC) clip the gradient against the weights; use clip_point='grad'")
        norm_type = parse_norm_type(group.get("norm_type", 2.0))
        if norm_type != 2.0 and (method.scope in (Scope.COORDINATE, Scope.UNIT) or owner.needs_weights):
            raise ValueError(f"Invalid norm_type value: {describe(norm_type)} with clipping method {method.name!r}: "
                             "norm_type is taken at global and layer scope only; coordinate scope clips |g_i| and "
                             "unit scope and the relative threshold (AGC) are defined on 2-norms: use norm_type=2")
        clip = cls(method=method, level=level, beta=beta, clip_point=clip_point, settings=settings,
                   norm_type=norm_type)
        if owner.check is not None:
            owner.check(clip)
        return clip

    @property
    def policy(self) -> ThresholdPolicy:
        """The method's threshold policy (thresholds/)."""
        return policy(self.method.threshold)

    @property
    def kernel_params(self) -> Tuple[float, ...]:
        """The numbers the fused kernels' threshold function reads (the policy's ``kernel_params``)."""
        return self.policy.kernel_params(self)

    @property
    def norm_kind(self) -> int:
        """The kernels' code of ``norm_type`` (norm_type.py: 0 the 2-norm, 1 inf, 2 any other p)."""
        return kind(self.norm_type)

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
        lr = number(group["lr"], "learning rate", allow_tensor=True)
        if not isinstance(lr, torch.Tensor) and lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}; expected lr >= 0")
        momentum = number(group["momentum"], "momentum")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}; expected momentum >= 0")
        dampening = number(group["dampening"], "dampening")
        weight_decay = number(group["weight_decay"], "weight_decay")
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
        lr = number(group["lr"], "learning rate", allow_tensor=True)
        if not isinstance(lr, torch.Tensor) and lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}; expected lr >= 0")
        beta1, beta2 = _betas(group["betas"])
        eps = number(group["eps"], "epsilon value")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}; expected eps >= 0")
        weight_decay = number(group["weight_decay"], "weight_decay")
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
        value = tensor_value(b, name, "beta") if isinstance(b, torch.Tensor) else number(b, name)
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
    (``clip``), the update rule applied after it (``update``) and the non-finite policy; and the skip
    rules (``skip``, skips/: the optimizer decides a skip, a backend sees only its flag)."""

    clip: ClipConfig
    update: Union[SGDUpdate, AdamWUpdate, ClipOnly]
    nonfinite: NonFinite
    skip: SkipConfig = NO_SKIP

    @classmethod
    def from_group(cls, group: dict) -> "GroupConfig":
        """Validate a ClippedSGD param group's settings; raises ValueError / TypeError naming the bad value."""
        update = SGDUpdate.from_group(group)
        clip = ClipConfig.from_group(group)
        return cls(clip=clip, update=update, nonfinite=choice(NonFinite, group["nonfinite"], "nonfinite"),
                   skip=SkipConfig.from_group(group))

    @classmethod
    def from_adamw_group(cls, group: dict) -> "GroupConfig":
        """Validate a ClippedAdamW param group's settings; raises ValueError / TypeError naming the bad value."""
        update = AdamWUpdate.from_group(group)
        clip = ClipConfig.from_group(group)
        if clip.clip_point is not ClipPoint.GRAD:
            raise ValueError(f"Invalid clip_point value: {clip.clip_point.value!r}; ClippedAdamW clips the gradient "
                             "before the moments (clip_point='grad')")
        return cls(clip=clip, update=update, nonfinite=choice(NonFinite, group["nonfinite"], "nonfinite"),
                   skip=SkipConfig.from_group(group))

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
    momentum_ready: torch.Tensor  # bool [n_params in group]
    stats: torch.Tensor  # float32 [len(STAT_NAMES)]
    skipped: torch.Tensor  # int64 [], steps skipped so far
    grad_scale: Optional[torch.Tensor] = None
    # an external skip flag (float32, nonzero: skip the step, counted in ``skipped``): a GradScaler's
    # found_inf, or a skip rule's decision (skips/)
    found_inf: Optional[torch.Tensor] = None
    grad_owners: Optional[List[torch.Tensor]] = None  # the tensors whose ``.grad`` are the gradients
    grad_ptrs: Optional[torch.Tensor] = None  # int64 [T] (CPU): the gradients' data pointers
    grad_ptrs_changed: bool = True  # whether grad_ptrs differ from the previous step's
    backend_cache: Optional[dict] = None  # the group's slot for a backend's own cached state
    # the threshold policy's state (thresholds/policy.py): values, counts, sorted values; None for a
    # stateless threshold.  Column c is the scope's column (0 at global scope, the parameter's position
    # in its group at layer scope)
    threshold_state: Optional[ThresholdState] = None
    # float32 [T + 1]: per-tensor norms then the global norm, already reduced across ranks (a sharded
    # group, torch_clip_fused/distributed/dtensor.py): the backend skips its norm stage and uses them;
    # a NaN global norm marks a non-finite gradient on some rank (the step is skipped unless
    # nonfinite="apply")
    given_norms: Optional[torch.Tensor] = None
    # float64, read with ``given_norms`` (a sharded group, torch_clip_fused/distributed/units.py): at unit scope
    # [U] the sums of squares of the gradients' units of the step's tensors (local units, in tensor order),
    # reduced across the ranks that split them, then with the relative threshold [U] the parameters'; with the
    # relative threshold at global or layer scope [T] the parameters' per-tensor sums of squares.  The backend
    # takes these instead of its own unit and weight norms
    given_sums: Optional[torch.Tensor] = None
    # AdamW (update code 2): ``first_moments`` hold exp_avg; these the second moments, amsgrad's maxima
    # (amsgrad only) and float32 [n_params in group], by column, the AdamW steps each parameter has taken
    # (torch's per-parameter ``state["step"]`` are 0-d views of it; +1 where a step is not skipped)
    exp_avg_sqs: Optional[List[torch.Tensor]] = None
    max_exp_avg_sqs: Optional[List[torch.Tensor]] = None
    adam_steps: Optional[torch.Tensor] = None
    # unit scope: per tensor of the step, the position of its first unit among the group's units laid end to
    # end in group order (every parameter of the group counted); the Philox index base of its units
    unit_offsets: Optional[List[int]] = None
    # per tensor of the step, (inner, extra): the Philox index of its local element l is
    # offsets[i] + l + (l // inner) * extra, its place in the unsharded group (a DTensor shard that is not one
    # row-major range of its parameter, e.g. Shard(1) of a matrix: inner = the shard's elements per row of
    # its cut dim, extra = the parameter's minus the shard's); None where every tensor's extra is 0
    index_rows: Optional[List[Tuple[int, int]]] = None
    # float32 [2, n_params in group] (tensor_stats.py): the backends write, by column, each tensor's norm (row 0)
    # and applied scale (row 1; a fraction clipped at unit and coordinate scope) during their passes; None: not
    # asked for (the functional API)
    tensor_stats: Optional[torch.Tensor] = None

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
