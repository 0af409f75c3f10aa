"""Clipping methods as data: scope x threshold x randomization (docs/spec.md sections 1 and 6).

A method is parsed and validated once, here; backends only read the enums.

With ||g|| the norm at the method's scope (Euclidean; |g_i| for a coordinate),
eta the threshold and alpha = eta / ||g||:

* no randomization:  s = min(1, alpha)
* linear:            s = alpha if ||g|| > eta and u < beta**alpha      else 1
* quadratic:         s = alpha if ||g|| > eta and u < beta**(alpha**2) else 1

and the clipped gradient is s * g (per tensor for ``layer``, per element for
``coordinate``).  ``||g|| == 0`` gives s = 1.

Example::

    >>> parse_method("quadratic_rand_autoclip")
    ClipMethod(scope='global', threshold='auto', randomization='quadratic')
    >>> ClipMethod("layer", "auto", "quadratic").name
    'layer+auto+quadratic'
    >>> parse_method("layer+auto+quadratic")  # every name is accepted back as clipping_type
    ClipMethod(scope='layer', threshold='auto', randomization='quadratic')
    >>> ClipMethod("coordinate", "auto")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    ValueError: Invalid clipping method: threshold 'auto' cannot be combined with scope 'coordinate' ...
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional, Union


class Scope(str, enum.Enum):
    """What one norm is taken over."""

    GLOBAL = "global"  # all gradients of the param group together
    LAYER = "layer"  # each parameter tensor
    COORDINATE = "coordinate"  # each element (absolute value)
    UNIT = "unit"  # each output unit: a slice along dim 0 (a matrix row, a conv filter); a 0-1 dim tensor is one


class Threshold(str, enum.Enum):
    """Where eta comes from."""

    CONSTANT = "constant"  # eta = clipping_level
    AUTO = "auto"  # eta = nearest-rank p_autoclip-quantile of the recorded norms
    ZSCORE = "zscore"  # ZClip: eta from EMAs of the norm's mean and variance when its z-score is a spike
    EMA_RELATIVE = "ema_relative"  # AdaGC: eta = adagc_lambda * EMA of the column's clipped norms, after a warm-up
    RELATIVE = "relative"  # AGC: eta = clipping_level * max(||w||, agc_eps), w the parameter over the same scope


class Randomization(str, enum.Enum):
    """How the clip decision is drawn."""

    NONE = "none"
    LINEAR = "linear"  # P(clip) = beta ** alpha
    QUADRATIC = "quadratic"  # P(clip) = beta ** (alpha ** 2)


def _enum_value(enum_cls, value, what: str):
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        valid = ", ".join(repr(e.value) for e in enum_cls)
        raise ValueError(f"Invalid {what}: {value!r}; valid choices are {valid}") from None


@dataclass(frozen=True)
class ClipMethod:
    """One clipping method.  ``scope=None`` means no clipping at all.

    Strings are accepted for each field and converted to the enums.
    """

    scope: Optional[Scope]
    threshold: Threshold = Threshold.CONSTANT
    randomization: Randomization = Randomization.NONE

    def __post_init__(self):
        if self.scope is None:
            object.__setattr__(self, "threshold", Threshold.CONSTANT)
            object.__setattr__(self, "randomization", Randomization.NONE)
            return
        object.__setattr__(self, "scope", _enum_value(Scope, self.scope, "clipping scope"))
        object.__setattr__(
            self, "threshold", _enum_value(Threshold, self.threshold, "clipping threshold")
        )
        object.__setattr__(
            self,
            "randomization",
            _enum_value(Randomization, self.randomization, "clipping randomization"),
        )
        if self.scope is Scope.COORDINATE and self.threshold is not Threshold.CONSTANT:
            raise ValueError(
                f"Invalid clipping method: threshold {self.threshold.value!r} cannot be combined with scope "
                "'coordinate' (coordinates are clipped at the constant clipping_level: there is no "
                f"per-coordinate norm to base another threshold on); use scope 'global' or 'layer' with "
                f"{self.threshold.value!r}, or a constant threshold"
            )
        if self.scope is Scope.UNIT and self.threshold not in (Threshold.CONSTANT, Threshold.RELATIVE):
            raise ValueError(
                f"Invalid clipping method: threshold {self.threshold.value!r} cannot be combined with scope 'unit' "
                "(a unit-scope threshold keeps no state per unit); use threshold 'constant' or 'relative', or "
                f"scope 'global' or 'layer' with {self.threshold.value!r}"
            )

    @property
    def clips(self) -> bool:
        return self.scope is not None

    @property
    def auto(self) -> bool:
        return self.threshold is Threshold.AUTO

    @property
    def randomized(self) -> bool:
        return self.randomization is not Randomization.NONE

    @property
    def name(self) -> str:
        """The original's clipping_type when one exists, else 'scope+threshold+randomization';
        ``parse_method(m.name) == m`` for every method."""
        for type_name, method in {**CLIPPING_TYPES, **EXTRA_CLIPPING_TYPES}.items():
            if method == self:
                return type_name
        return f"{self.scope.value}+{self.threshold.value}+{self.randomization.value}"

    def __repr__(self) -> str:
        if self.scope is None:
            return "ClipMethod(scope=None)"
        return (
            f"ClipMethod(scope={self.scope.value!r}, threshold={self.threshold.value!r}, "
            f"randomization={self.randomization.value!r})"
        )


NO_CLIP = ClipMethod(None)

#: The original torch-clip 0.0.6 names (docs/spec.md section 1).
CLIPPING_TYPES = {
    "no_clip": NO_CLIP,
    "norm": ClipMethod(Scope.GLOBAL),
    "linear_rand_norm": ClipMethod(Scope.GLOBAL, Threshold.CONSTANT, Randomization.LINEAR),
    "quadratic_rand_norm": ClipMethod(Scope.GLOBAL, Threshold.CONSTANT, Randomization.QUADRATIC),
    "layer_wise": ClipMethod(Scope.LAYER),
    "coordinate_wise": ClipMethod(Scope.COORDINATE),
    "auto_clip": ClipMethod(Scope.GLOBAL, Threshold.AUTO),
    "linear_rand_autoclip": ClipMethod(Scope.GLOBAL, Threshold.AUTO, Randomization.LINEAR),
    "quadratic_rand_autoclip": ClipMethod(Scope.GLOBAL, Threshold.AUTO, Randomization.QUADRATIC),
}

#: Names of methods beyond the original's (docs/spec.md section 1), accepted as ``clipping_type=``.
#: Kept apart from CLIPPING_TYPES, the original's names that the demo and comparisons iterate over.
EXTRA_CLIPPING_TYPES = {
    "zclip": ClipMethod(Scope.GLOBAL, Threshold.ZSCORE),  # ZClip (Kumar et al., 2025)
    "adagc": ClipMethod(Scope.LAYER, Threshold.EMA_RELATIVE),  # AdaGC (Wang et al., 2025)
    "agc": ClipMethod(Scope.UNIT, Threshold.RELATIVE),  # adaptive gradient clipping (Brock et al., 2021)
}

#: Names used in the original's published figures.
ALIASES = {
    "linear_stoch_norm": "linear_rand_norm",
    "quadratic_stoch_norm": "quadratic_rand_norm",
    "linear_stoch_autoclip": "linear_rand_autoclip",
    "quadratic_stoch_autoclip": "quadratic_rand_autoclip",
}

#: The smallest normal float32: alpha = eta / max(||g||, TINY), so that ||g|| = 0 gives a finite alpha
#: (and s = 1, since 0 is never above eta).  Every backend uses this value.
TINY = 1.1754943508222875e-38

#: Integer codes of the scopes, threshold policies, randomizations and update rules, shared by the
#: C++ and Triton kernels (which reject any other code).
SCOPE_CODES = {None: 0, Scope.GLOBAL: 1, Scope.LAYER: 2, Scope.COORDINATE: 3, Scope.UNIT: 4}
THRESHOLD_CODES = {Threshold.CONSTANT: 0, Threshold.AUTO: 1, Threshold.ZSCORE: 2, Threshold.EMA_RELATIVE: 3,
                   Threshold.RELATIVE: 4}
RANDOMIZATION_CODES = {Randomization.NONE: 0, Randomization.LINEAR: 1, Randomization.QUADRATIC: 2}
UPDATE_CODES = {"clip_only": 0, "sgd": 1, "adamw": 2}  # the apply stage's epilogue: the clipped gradient, SGD, AdamW

#: clipping_level used when the user passes None (the original's documented defaults).
DEFAULT_LEVELS = {Scope.GLOBAL: 1.0, Scope.LAYER: 1.0, Scope.COORDINATE: 0.1, Scope.UNIT: 1.0}

#: Separator of the three parts of a method's name ``"scope+threshold+randomization"`` (ClipMethod.name).
TRIPLE_SEPARATOR = "+"


def parse_method(clipping_type: Union[str, ClipMethod]) -> ClipMethod:
    """Turn a clipping_type name, alias, ``"scope+threshold+randomization"`` name (what
    ``ClipMethod.name`` gives for a method the original has no name for) or ClipMethod into a
    ClipMethod.

    >>> parse_method("layer_wise")
    ClipMethod(scope='layer', threshold='constant', randomization='none')
    >>> parse_method("linear_stoch_norm") == parse_method("linear_rand_norm")
    True
    >>> parse_method("no_clip")
    ClipMethod(scope=None)
    >>> parse_method("coordinate+constant+linear")
    ClipMethod(scope='coordinate', threshold='constant', randomization='linear')
    """
    if isinstance(clipping_type, ClipMethod):
        return clipping_type
    if isinstance(clipping_type, str):
        key = ALIASES.get(clipping_type, clipping_type)
        if key in CLIPPING_TYPES:
            return CLIPPING_TYPES[key]
        if key in EXTRA_CLIPPING_TYPES:
            return EXTRA_CLIPPING_TYPES[key]
        if TRIPLE_SEPARATOR in clipping_type:
            return _parse_triple(clipping_type)
    valid = ", ".join(list(CLIPPING_TYPES) + list(ALIASES) + list(EXTRA_CLIPPING_TYPES))
    raise ValueError(
        f"Invalid clipping_type: {clipping_type!r}; valid names are {valid}, "
        "a 'scope+threshold+randomization' name (e.g. 'layer+auto+quadratic'), "
        "or a torch_clip_fused.ClipMethod(scope, threshold, randomization)"
    )


def _parse_triple(name: str) -> ClipMethod:
    """``"scope+threshold+randomization"`` (each part an enum value) into its ClipMethod."""
    parts = name.split(TRIPLE_SEPARATOR)
    if len(parts) != 3:
        raise ValueError(
            f"Invalid clipping_type: {name!r}; a method's name is 'scope+threshold+randomization' (three parts "
            f"joined by '+', e.g. 'layer+auto+quadratic'), got {len(parts)} part{'s' if len(parts) != 1 else ''}"
        )
    try:
        return ClipMethod(*parts)
    except ValueError as err:
        raise ValueError(f"Invalid clipping_type: {name!r}: {err}") from None


def default_level(method: ClipMethod) -> float:
    """The clipping_level a method uses when none is given."""
    if method.scope is None:
        return 1.0
    return DEFAULT_LEVELS[method.scope]


def _reduce_clip_method(method: ClipMethod):
    if method.scope is None:
        return (ClipMethod, (None,))
    return (ClipMethod, (method.scope.value, method.threshold.value, method.randomization.value))


ClipMethod.__reduce__ = _reduce_clip_method
