"""The optimizer test database, after torch's ``OptimizerInfo`` / ``optim_db``
(torch/testing/_internal/common_optimizers.py).

One :class:`OptimizerInfo` per optimizer (ClippedSGD, ClippedAdamW, ClippedSSTM) says, as data:

* ``optim_inputs_func(backend)``: valid constructor kwargs (clipping types of every kind,
  randomized and AutoClip included, and the optimizer's own settings); the Triton backend
  runs in Triton's interpreter on this CPU-only machine, so it gets a marked subset;
* ``optim_error_inputs_func(backend)``: inputs that must raise, with the error type, a regex of
  the message and when (:class:`ErrorOn`): at construction, or at ``step()`` after a few good
  steps (a broken setting, gradient or environment), in which case nothing may have moved;
* the independent oracles of the generic tests (tests/test_optim_db.py): torch.optim.SGD after
  torch's own clipping functions for ClippedSGD (torch.optim.AdamW for ClippedAdamW), a direct implementation of the paper's
  recurrences for ClippedSSTM, and closed forms of the threshold each step uses;
* ``torch_twin`` (ClippedSGD, ClippedAdamW): torch's own optimizer with torch's clipping, stepped
  alongside ours where a test drives both (param groups with their own settings, LR schedulers);
* ``known_bugs``: library bugs the generic tests found, each a strict xfail with its reason.

What PyTorch's generic optimizer tests check (test/test_optim.py, run on ClippedSGD / ClippedAdamW
by tests/torch_optim/) is covered here for every optimizer and backend, against these oracles.

Tensors stay tiny (103 elements in three tensors, one spanning two Triton chunks of 64).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Union

import torch

from conftest import heavy_tailed
from torch_clip_fused import ClipMethod, ClippedAdamW, ClippedSGD, ClippedSSTM, parse_method

BACKENDS = ("reference", "cpp", "triton")
#: step() errors raised before any backend runs are checked on these only (the interpreter is slow)
NOT_TRITON = ("reference", "cpp")
#: 20 + 3 + 80 elements: the last tensor spans two chunks of the shrunk Triton chunk (64)
SHAPES = ((4, 5), (3,), (2, 40))
#: Triton launch shapes for the interpreter (tests/test_clipped_sgd_triton.py does the same)
TRITON_INTERPRETER_SIZES = dict(CHUNK_SIZE=64, BLOCK_SIZE=16, REDUCE_BLOCK=16)


class ErrorOn(enum.Enum):
    """When an error input must raise (torch's OptimizerErrorEnum)."""

    CONSTRUCTION = "construction"
    STEP = "step"


@dataclass(frozen=True)
class OptimizerInput:
    """Valid constructor kwargs (besides params, seed and backend)."""

    kwargs: dict
    desc: str
    triton: bool = False  # part of the subset run on the Triton interpreter

    def __repr__(self):
        return self.desc


@dataclass(frozen=True)
class ErrorOptimizerInput:
    """An input that must raise ``error_type`` with a message matching ``error_regex``.

    The optimizer is built on two param groups ``a`` and ``b`` (see make_group_params) with the
    info's ``error_base_kwargs`` updated by ``kwargs`` (a callable when building them is what
    raises); ``params(a, b)`` replaces the params argument.  With ``ErrorOn.STEP``, ``good_steps``
    good steps run first, then ``setup(opt, a, b, monkeypatch)`` breaks something (after fresh
    gradients were set) and ``step()`` must raise without modifying any parameter or any state."""

    desc: str
    error_type: type
    error_regex: str
    error_on: ErrorOn = ErrorOn.CONSTRUCTION
    kwargs: Union[dict, Callable[[], dict]] = field(default_factory=dict)  # a callable is built lazily
    params: Optional[Callable] = None
    setup: Optional[Callable] = None
    backends: Sequence[str] = BACKENDS
    good_steps: int = 2

    def make_kwargs(self) -> dict:
        """The kwargs (a callable ``kwargs`` is called here: building them may be what raises)."""
        return self.kwargs() if callable(self.kwargs) else dict(self.kwargs)

    def __repr__(self):
        return self.desc


@dataclass(frozen=True)
class KnownBug:
    """A library bug found by a generic test: that test's matching cases are strict xfails."""

    test: str  # the generic test's function name
    reason: str
    applies: Callable = lambda backend, case: True  # (backend, OptimizerInput or ErrorOptimizerInput) -> bool


@dataclass(frozen=True)
class ApplyCase:
    """A nonfinite="apply" run checked against the info's ``apply_oracle``: two finite steps, one
    with ``poison`` ("inf", "nan" or "both") in the gradients, one finite step again."""

    kwargs: dict
    poison: str
    desc: str

    def __repr__(self):
        return self.desc


@dataclass(frozen=True)
class OptimizerInfo:
    optim_cls: type
    base_kwargs: dict  # the required arguments every input starts from
    optim_inputs_func: Callable[[str], List[OptimizerInput]]
    optim_error_inputs_func: Callable[[str], List[ErrorOptimizerInput]]
    error_base_kwargs: dict  # the working setting error inputs at step() start from
    #: (kwargs, initial params, gradients of each step) -> the parameters after those steps
    apply_oracle: Callable
    apply_cases: List[ApplyCase]
    #: (kwargs, number of steps taken) -> the threshold the last step used (constant-threshold methods)
    threshold_oracle: Callable
    #: state keys a skipped step may change (the group's counters and last-step statistics)
    counter_keys: frozenset = frozenset({"clip_step", "clip_steps", "clip_skipped", "clip_stats"})
    #: relative tolerance of "the step after a skipped one equals a twin's that never saw it" (0: bit
    #: for bit); with its reason
    skip_continuation_rtol: float = 0.0
    skip_continuation_reason: str = ""
    known_bugs: List[KnownBug] = field(default_factory=list)
    #: [(params, kwargs), ...] (one pair per param group) -> a TorchTwin, or None (no torch counterpart)
    torch_twin: Optional[Callable] = None
    #: whether lr may be a one-element tensor (torch.optim's optimizers: yes)
    tensor_lr: bool = True

    @property
    def name(self) -> str:
        return self.optim_cls.__name__

    def make(self, params, kwargs: dict, backend: str, seed: int = 3):
        return self.optim_cls(params, **{**self.base_kwargs, **kwargs, "seed": seed, "backend": backend})

    def bug(self, test: str, backend: str, case) -> Optional[str]:
        """The reasons of the known bugs that make this case of ``test`` fail, or None."""
        reasons = [known.reason for known in self.known_bugs if known.test == test and known.applies(backend, case)]
        return " AND ".join(reasons) or None

    def __repr__(self):
        return self.name


# --------------------------------------------------------------------------------------------
# Parameters and gradients
# --------------------------------------------------------------------------------------------


def device_for(backend: str) -> str:
    """Where a backend's cases run: Triton on CUDA when there is a GPU (its kernels are compiled for
    it), else everything on CPU (Triton in its interpreter, as tests/conftest.py sets up)."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def make_params(seed: int = 0, shapes=SHAPES, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed + 10_000)
    return [torch.randn(s, generator=gen).to(dtype=dtype, device=device).requires_grad_() for s in shapes]


def gradients(params, seed: int) -> List[torch.Tensor]:
    """Heavy-tailed gradients for ``params`` (drawn on CPU, put on the parameters' device)."""
    gen = torch.Generator().manual_seed(seed)
    return [heavy_tailed(p.shape, gen, p.dtype).to(p.device) for p in params]


def set_grads(params, seed: int) -> None:
    for p, g in zip(params, gradients(params, seed)):
        p.grad = g


def poison_(grads, poison: str) -> None:
    """Put inf (in the second tensor) and/or NaN (in the third) into a list of gradients."""
    if poison in ("inf", "both"):
        grads[1][0] = float("inf")
    if poison in ("nan", "both"):
        grads[2][1, 5] = float("nan")


def make_group_params(device="cpu"):
    """The two param groups error inputs are built on."""
    return make_params(seed=0, device=device), make_params(seed=1, device=device)


# --------------------------------------------------------------------------------------------
# Independent oracles: torch's clipping functions, torch.optim.SGD, the SSTM recurrences
# --------------------------------------------------------------------------------------------


def _level(kwargs) -> float:
    method = parse_method(kwargs.get("clipping_type", "norm"))
    level = kwargs.get("clipping_level")
    if level is not None:
        return float(level)
    return 0.1 if method.scope is not None and method.scope.value == "coordinate" else 1.0


def torch_clip_(grads: List[torch.Tensor], clipping_type, level: float) -> None:
    """Clip ``grads`` in place with torch.nn.utils' functions (non-randomized constant methods):
    ``norm`` = clip_grad_norm_, ``layer_wise`` = clip_grad_norm_ per tensor, ``coordinate_wise``
    = clip_grad_value_ (docs/spec.md section 1)."""
    holders = []
    for g in grads:
        h = torch.zeros_like(g, requires_grad=True)
        h.grad = g
        holders.append(h)
    if clipping_type == "no_clip":
        return
    if clipping_type == "norm":
        torch.nn.utils.clip_grad_norm_(holders, level, error_if_nonfinite=False, foreach=False)
    elif clipping_type == "layer_wise":
        for h in holders:
            torch.nn.utils.clip_grad_norm_([h], level, error_if_nonfinite=False, foreach=False)
    elif clipping_type == "coordinate_wise":
        torch.nn.utils.clip_grad_value_(holders, level, foreach=False)
    else:
        raise ValueError(f"no torch oracle for {clipping_type!r}")


#: clipping types torch_clip_ implements (constant thresholds, no randomization)
TORCH_CLIPPING_TYPES = ("no_clip", "norm", "layer_wise", "coordinate_wise")


def oracle_handles(kwargs: dict) -> bool:
    """Whether the apply oracles and torch twins implement this input (torch's clipping functions
    exist for constant, non-randomized clipping of the gradient only)."""
    return kwargs.get("clipping_type", "norm") in TORCH_CLIPPING_TYPES and kwargs.get("clip_point", "grad") == "grad"


class TorchTwin:
    """torch's optimizer over clones of the parameters, the gradients clipped with torch's clipping
    functions before its step: ``norm`` groups with ONE ``clip_grad_norm_`` over all of them (the
    optimizers' default, ``per_group_norm=False``; each group alone with ``per_group_norm=True``), other
    types per group.  ``optimizer`` is torch's optimizer (attach LR schedulers to it); ``params`` the
    clones, one list per group."""

    def __init__(self, torch_cls, keys, groups, per_group_norm: bool = False):
        self.params = [[p.detach().clone().requires_grad_() for p in params] for params, _ in groups]
        self.kwargs = [kwargs for _, kwargs in groups]
        self.per_group_norm = per_group_norm
        self.optimizer = torch_cls([dict(params=ps, **{k: kw[k] for k in keys if k in kw})
                                    for ps, kw in zip(self.params, self.kwargs)], foreach=False)

    def step(self, grads_per_group) -> None:
        # ours clip -g when maximizing; torch negates after
        signs = [-1.0 if kwargs.get("maximize") else 1.0 for kwargs in self.kwargs]
        clipped = [[sign * g.clone() for g in grads] for sign, grads in zip(signs, grads_per_group)]
        types = [kwargs.get("clipping_type", "norm") for kwargs in self.kwargs]
        shared = [] if self.per_group_norm else [k for k, t in enumerate(types) if t == "norm"]
        if shared:
            torch_clip_([g for k in shared for g in clipped[k]], "norm", _level(self.kwargs[shared[0]]))
        for k, (kwargs, grads) in enumerate(zip(self.kwargs, clipped)):
            if k not in shared:
                torch_clip_(grads, types[k], _level(kwargs))
        for params, sign, grads in zip(self.params, signs, clipped):
            for p, g in zip(params, grads):
                p.grad = sign * g
        self.optimizer.step()


def _apply_with_twin(make_twin, kwargs: dict, params0, grads_per_step):
    twin = make_twin([(params0, kwargs)])
    for grads in grads_per_step:
        twin.step([grads])
    return [p.detach() for p in twin.params[0]]


SGD_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")


def sgd_twin(groups, per_group_norm: bool = False) -> TorchTwin:
    return TorchTwin(torch.optim.SGD, SGD_KEYS, groups, per_group_norm)


def sgd_apply_oracle(kwargs: dict, params0, grads_per_step):
    """torch.optim.SGD after torch's clipping of each step's gradients."""
    return _apply_with_twin(sgd_twin, kwargs, params0, grads_per_step)


def sstm_alpha(k: int, kwargs: dict) -> float:
    """alpha_{k+1} = (k + 1)^(2 nu / (1 + nu)) / (2 a L), a = 1 / lr (Gorbunov et al. 2020)."""
    nu = kwargs.get("nu", 1.0)
    return (k + 1) ** (2 * nu / (1 + nu)) / (2 * (1.0 / kwargs["lr"]) * kwargs["L"])


def sstm_level(kwargs: dict) -> float:
    """B: clipping_level, or with clipping_iter_start (nu > 0, ``norm``) B = alpha at that iteration."""
    start = kwargs.get("clipping_iter_start")
    if start is not None and kwargs.get("nu", 1.0) > 0 and kwargs.get("clipping_type", "norm") == "norm":
        return sstm_alpha(start, kwargs)
    return _level(kwargs)


def sstm_apply_oracle(kwargs: dict, params0, grads_per_step):
    """The paper's recurrences, written directly: y^0 = z^0 = x^0, A_0 = 0,
    x^{k+1} = (A_k y^k + alpha z^k) / A_{k+1}, z^{k+1} = z^k - alpha clip(g, B / alpha),
    y^{k+1} = (A_k y^k + alpha z^{k+1}) / A_{k+1}; with a_k_ratio_upper_bound r < 1, A_k is
    replaced by (f - 1) alpha when A_k > f alpha, f = 1 / (1 - r) (torch-clip 0.0.6's rule)."""
    y = [p.detach().clone() for p in params0]
    z = [p.detach().clone() for p in params0]
    bound = kwargs.get("a_k_ratio_upper_bound", 1.0)
    level = sstm_level(kwargs)

    def coefficients(k, a_k):
        alpha = sstm_alpha(k, kwargs)
        if bound < 1.0 and a_k > alpha / (1.0 - bound):
            a_k = (1.0 / (1.0 - bound) - 1.0) * alpha
        return a_k, alpha, a_k + alpha

    a_k = 0.0
    for k, grads in enumerate(grads_per_step):
        a_k, alpha, a_next = coefficients(k, a_k)
        grads = [g.clone() for g in grads]
        torch_clip_(grads, kwargs.get("clipping_type", "norm"), level / alpha)
        z = [zi - alpha * g for zi, g in zip(z, grads)]
        y = [(a_k * yi + alpha * zi) / a_next for yi, zi in zip(y, z)]
        a_k = a_next
    a_k, alpha, a_next = coefficients(len(grads_per_step), a_k)
    return [(a_k * yi + alpha * zi) / a_next for yi, zi in zip(y, z)]  # x^{k+2}: the parameters


def sgd_threshold(kwargs: dict, steps: int) -> float:
    method = parse_method(kwargs.get("clipping_type", "norm"))
    return math.inf if not method.clips else _level(kwargs)


def sstm_threshold(kwargs: dict, steps: int) -> float:
    """lambda_k = B / alpha_k of the last of ``steps`` steps."""
    method = parse_method(kwargs.get("clipping_type", "norm"))
    return math.inf if not method.clips else sstm_level(kwargs) / sstm_alpha(steps - 1, kwargs)


# --------------------------------------------------------------------------------------------
# ClippedSGD
# --------------------------------------------------------------------------------------------


def optim_inputs_func_clipped_sgd(backend: str) -> List[OptimizerInput]:
    inputs = [
        OptimizerInput(dict(clipping_type="no_clip", momentum=0.9), "no_clip-momentum"),
        OptimizerInput(dict(clipping_type="norm", clipping_level=3.0), "norm"),
        OptimizerInput(dict(clipping_type="norm", clipping_level=3.0, momentum=0.9, weight_decay=0.01, nesterov=True),
                       "norm-nesterov-wd", triton=True),
        OptimizerInput(dict(clipping_type="linear_rand_norm", clipping_level=15.0, beta=0.1, momentum=0.9,
                            dampening=0.1), "linear_rand_norm-dampening"),
        OptimizerInput(dict(clipping_type="quadratic_rand_norm", clipping_level=15.0, beta=0.1, maximize=True),
                       "quadratic_rand_norm-maximize"),
        OptimizerInput(dict(clipping_type="layer_wise", clipping_level=1.5, momentum=0.9, weight_decay=0.01),
                       "layer_wise-wd"),
        OptimizerInput(dict(clipping_type="coordinate_wise", clipping_level=0.5, momentum=0.9, nesterov=True),
                       "coordinate_wise-nesterov"),
        OptimizerInput(dict(clipping_type="auto_clip", p_autoclip=0.5, momentum=0.9), "auto_clip"),
        OptimizerInput(dict(clipping_type="linear_rand_autoclip", p_autoclip=0.5, beta=0.1, autoclip_history=2),
                       "linear_rand_autoclip-history2"),
        OptimizerInput(dict(clipping_type="quadratic_stoch_autoclip", p_autoclip=0.3, beta=0.1, momentum=0.5),
                       "quadratic_stoch_autoclip-alias", triton=True),
        OptimizerInput(dict(clipping_type=ClipMethod("layer", "auto", "quadratic"), p_autoclip=0.5, beta=0.1,
                            momentum=0.9), "layer+auto+quadratic"),
        OptimizerInput(dict(clipping_type=ClipMethod("coordinate", "constant", "linear"), clipping_level=0.5,
                            beta=0.1, momentum=0.9), "coordinate+constant+linear", triton=True),
        OptimizerInput(dict(clipping_type="layer_wise", clipping_level=1.5, momentum=0.9, clip_point="update"),
                       "layer_wise-clip_point_update"),
        OptimizerInput(dict(clipping_type="norm", clipping_level=2, momentum=0.9, dampening=0.5), "norm-int_level"),
    ]
    return [i for i in inputs if i.triton] if backend == "triton" else inputs


def _set_group(key, value, index=1):
    def setup(opt, a, b, monkeypatch):
        opt.param_groups[index][key] = value
    return setup


def _sparse_grad(opt, a, b, monkeypatch):
    b[0].grad = b[0].grad.to_sparse()


def _strided_grad(opt, a, b, monkeypatch):
    """A gradient whose strides are not its parameter's (a transposed buffer)."""
    b[0].grad = b[0].grad.t().contiguous().t()


def _nan_grad(opt, a, b, monkeypatch):
    b[2].grad[0, 0] = float("nan")


def _no_interpreter(opt, a, b, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _common_error_inputs(backend: str) -> List[ErrorOptimizerInput]:
    """Error inputs both optimizers share (torch's get_error_inputs_for_all_optims and ours)."""
    S = ErrorOn.STEP
    inputs = [
        ErrorOptimizerInput("params-a-tensor", TypeError,
                            r"params argument given to the optimizer should be an iterable of Tensors or dicts",
                            params=lambda a, b: a[0]),
        ErrorOptimizerInput("param-twice-in-a-group", ValueError,  # torch only warns; it would be stepped twice
                            r"parameter 1 of param group 0 is the same tensor as parameter 0",
                            params=lambda a, b: [a[0], a[0]]),
        ErrorOptimizerInput("param-in-two-groups", ValueError,
                            r"some parameters appear in more than one parameter group",
                            params=lambda a, b: [{"params": a}, {"params": a[:1]}]),
        ErrorOptimizerInput("complex-param", ValueError, r"does not support complex parameters.*complex64",
                            params=lambda a, b: [torch.zeros(3, dtype=torch.complex64, requires_grad=True)]),
        ErrorOptimizerInput("named-and-unnamed-params", ValueError,  # torch's wording (torch.optim.Optimizer)
                            r"all optimizer params should be with/without names. Some param names are missing",
                            params=lambda a, b: [("weight", a[0]), a[1]]),
        ErrorOptimizerInput("named-and-unnamed-groups", ValueError,
                            r"all optimizer param groups should be with/without names. cannot add param group "
                            r"with names to the optimizer",
                            params=lambda a, b: [{"params": a[:1]}, {"params": [("weight", b[0])]}]),
        ErrorOptimizerInput("two-devices-in-a-group", ValueError, r"several devices \(\['(cpu|cuda:0)', 'meta'\]\)",
                            params=lambda a, b: [a[0], torch.zeros(3, device="meta", requires_grad=True)]),
        ErrorOptimizerInput("bad-clipping_type", ValueError, r"Invalid clipping_type: 'nrom'; valid names are",
                            kwargs=dict(clipping_type="nrom")),
        ErrorOptimizerInput("auto-per-coordinate", ValueError,
                            r"threshold 'auto' cannot be combined with scope 'coordinate'",
                            kwargs=lambda: dict(clipping_type=ClipMethod("coordinate", "auto"))),  # raises when built
        ErrorOptimizerInput("negative-clipping_level", ValueError, r"Invalid clipping_level value: -1.0",
                            kwargs=dict(clipping_level=-1.0)),
        ErrorOptimizerInput("nan-clipping_level", ValueError, r"Invalid clipping_level value: nan",
                            kwargs=dict(clipping_level=float("nan"))),
        ErrorOptimizerInput("beta-0", ValueError, r"Invalid beta value: 0.0; expected 0 < beta < 1",
                            kwargs=dict(beta=0.0)),
        ErrorOptimizerInput("p_autoclip-above-1", ValueError, r"Invalid p_autoclip value: 1.01",
                            kwargs=dict(p_autoclip=1.01)),
        ErrorOptimizerInput("autoclip_history-0", ValueError, r"Invalid autoclip_history value: 0",
                            kwargs=dict(autoclip_history=0)),
        ErrorOptimizerInput("bad-nonfinite", ValueError, r"Invalid nonfinite value: 'ignore'; valid choices are",
                            kwargs=dict(nonfinite="ignore")),
        ErrorOptimizerInput("bad-backend", ValueError, r"Invalid backend: 'cuda'; valid choices are",
                            kwargs=dict(backend="cuda")),
        ErrorOptimizerInput("seed-2**32", ValueError, r"Invalid seed value: 4294967296", kwargs=dict(seed=2**32)),
        ErrorOptimizerInput("bad-setting-in-a-param-group", ValueError, r"Invalid beta value: 1.5",
                            params=lambda a, b: [{"params": a}, {"params": b, "beta": 1.5}]),
        # at step(), after two good steps
        ErrorOptimizerInput("group-beta-set-to-2", ValueError, r"Invalid beta value: 2.0", S,
                            setup=_set_group("beta", 2.0)),
        ErrorOptimizerInput("group-clipping_type-set-to-bogus", ValueError, r"Invalid clipping_type: 'bogus'", S,
                            setup=_set_group("clipping_type", "bogus"), backends=NOT_TRITON),
        ErrorOptimizerInput("nan-grad-with-nonfinite-raise", FloatingPointError,
                            r"non-finite gradient \(inf or NaN\) in param group 1.*nothing was modified", S,
                            kwargs=dict(nonfinite="raise"), setup=_nan_grad),
        ErrorOptimizerInput("sparse-grad", RuntimeError, r"does not support sparse gradients \(param group 1, parameter 0\)",
                            S, setup=_sparse_grad, backends=NOT_TRITON),
        ErrorOptimizerInput("grad-strides-differ", RuntimeError,
                            rf"backend='{backend}': the gradient of parameter 0 (of param group 1 )?has strides .* "
                            r"but the parameter has",
                            S, setup=_strided_grad, backends=("cpp", "triton")),
        # at the first step: the backend is chosen then, per group; kernels made under the
        # interpreter keep running under it if the variable goes away later
        ErrorOptimizerInput("triton-without-interpreter-on-cpu", RuntimeError, r"TRITON_INTERPRET=1", S,
                            setup=_no_interpreter, backends=() if torch.cuda.is_available() else ("triton",),
                            good_steps=0),
    ]
    return [i for i in inputs if backend in i.backends]


#: torch's error for a tensor lr of several elements (its get_error_inputs_for_all_optims)
TENSOR_LR_TORCH_WORDING = ErrorOptimizerInput("two-element-tensor-lr-torch-wording", ValueError,
                                              r"Tensor lr must be 1-element", kwargs=dict(lr=torch.tensor([1e-3, 1e-3])))


def optim_error_inputs_func_clipped_sgd(backend: str) -> List[ErrorOptimizerInput]:
    S = ErrorOn.STEP
    inputs = _common_error_inputs(backend) + [
        ErrorOptimizerInput("negative-lr", ValueError, r"Invalid learning rate: -0.1", kwargs=dict(lr=-0.1)),
        ErrorOptimizerInput("str-lr", TypeError, r"Invalid learning rate value: 'fast'", kwargs=dict(lr="fast")),
        ErrorOptimizerInput("two-element-tensor-lr", ValueError, r"learning rate.*one element",
                            kwargs=dict(lr=torch.tensor([0.1, 0.1]))),
        TENSOR_LR_TORCH_WORDING,
        ErrorOptimizerInput("negative-momentum", ValueError, r"Invalid momentum value: -0.5", kwargs=dict(momentum=-0.5)),
        ErrorOptimizerInput("negative-weight_decay", ValueError, r"Invalid weight_decay value: -1.0",
                            kwargs=dict(weight_decay=-1.0)),
        ErrorOptimizerInput("nesterov-without-momentum", ValueError, r"nesterov momentum requires momentum > 0",
                            kwargs=dict(nesterov=True, momentum=0.0)),
        ErrorOptimizerInput("bad-clip_point", ValueError, r"Invalid clip_point value: 'weights'",
                            kwargs=dict(clip_point="weights")),
        ErrorOptimizerInput("foreach-False", ValueError, r"Invalid foreach value: False", kwargs=dict(foreach=False)),
        ErrorOptimizerInput("differentiable", ValueError, r"Invalid differentiable value: True",
                            kwargs=dict(differentiable=True)),
        ErrorOptimizerInput("negative-lr-in-a-param-group", ValueError, r"Invalid learning rate: -1.0",
                            params=lambda a, b: [{"params": a}, {"params": b, "lr": -1.0}]),
        ErrorOptimizerInput("group-lr-set-negative", ValueError, r"Invalid learning rate: -1.0", S,
                            setup=_set_group("lr", -1.0), backends=NOT_TRITON),
        ErrorOptimizerInput("group-momentum-set-negative", ValueError, r"Invalid momentum value: -1.0", S,
                            setup=_set_group("momentum", -1.0), backends=NOT_TRITON),
    ]
    if backend == "cpp":
        inputs.append(ErrorOptimizerInput("fused-False-with-cpp", ValueError,
                                          r"Invalid fused value: False with backend='cpp'", kwargs=dict(fused=False)))
    return inputs


def _in(*descs, backends=BACKENDS):
    return lambda backend, case: backend in backends and getattr(case, "desc", None) in descs


clipped_sgd_info = OptimizerInfo(
    optim_cls=ClippedSGD,
    base_kwargs=dict(lr=0.1),
    optim_inputs_func=optim_inputs_func_clipped_sgd,
    optim_error_inputs_func=optim_error_inputs_func_clipped_sgd,
    error_base_kwargs=dict(clipping_type="auto_clip", p_autoclip=0.5, momentum=0.9),
    apply_oracle=sgd_apply_oracle,
    apply_cases=[
        ApplyCase(dict(clipping_type="no_clip", momentum=0.9, dampening=0.1, weight_decay=0.01), "both",
                  "no_clip-momentum-inf-and-nan"),
        ApplyCase(dict(clipping_type="no_clip", momentum=0.9, nesterov=True, maximize=True), "both",
                  "no_clip-nesterov-maximize-inf-and-nan"),
        ApplyCase(dict(clipping_type="no_clip"), "nan", "no_clip-plain-nan"),
        ApplyCase(dict(clipping_type="norm", clipping_level=3.0, momentum=0.9), "inf", "norm-inf"),
        ApplyCase(dict(clipping_type="layer_wise", clipping_level=1.5, momentum=0.9), "inf", "layer_wise-inf"),
        ApplyCase(dict(clipping_type="coordinate_wise", clipping_level=0.5, momentum=0.9), "both",
                  "coordinate_wise-inf-and-nan"),
    ],
    threshold_oracle=sgd_threshold,
    # the ClippedSGD bugs these tests found before are fixed (duplicate params, 0 * inf, Triton inf norm...)
    torch_twin=sgd_twin,
)


# --------------------------------------------------------------------------------------------
# ClippedSSTM
# --------------------------------------------------------------------------------------------


def optim_inputs_func_clipped_sstm(backend: str) -> List[OptimizerInput]:
    inputs = [
        OptimizerInput(dict(clipping_type="no_clip"), "no_clip"),
        OptimizerInput(dict(clipping_type="norm", clipping_level=1.0), "norm"),
        OptimizerInput(dict(clipping_type="norm", clipping_level=1.0, nu=0.5, a_k_ratio_upper_bound=0.6),
                       "norm-nu0.5-ratio_bound0.6"),
        OptimizerInput(dict(clipping_type="norm", clipping_iter_start=2), "norm-clipping_iter_start2"),
        OptimizerInput(dict(clipping_type="linear_rand_norm", clipping_level=4.0, beta=0.1), "linear_rand_norm"),
        OptimizerInput(dict(clipping_type="layer_wise", clipping_level=0.5, nu=0.0), "layer_wise-nu0", triton=True),
        OptimizerInput(dict(clipping_type="coordinate_wise", clipping_level=0.05), "coordinate_wise"),
        OptimizerInput(dict(clipping_type="auto_clip", p_autoclip=0.5), "auto_clip", triton=True),
        OptimizerInput(dict(clipping_type="quadratic_rand_autoclip", p_autoclip=0.5, beta=0.1, autoclip_history=2),
                       "quadratic_rand_autoclip-history2"),
        OptimizerInput(dict(clipping_type=ClipMethod("layer", "auto", "linear"), p_autoclip=0.5, beta=0.1,
                            a_k_ratio_upper_bound=0.9), "layer+auto+linear-ratio_bound0.9"),
    ]
    return [i for i in inputs if i.triton] if backend == "triton" else inputs


def optim_error_inputs_func_clipped_sstm(backend: str) -> List[ErrorOptimizerInput]:
    S = ErrorOn.STEP
    return _common_error_inputs(backend) + [
        ErrorOptimizerInput("lr-0", ValueError, r"Invalid learning rate: 0.0", kwargs=dict(lr=0.0)),
        ErrorOptimizerInput("str-lr", TypeError, r"Invalid learning rate value: 'fast'", kwargs=dict(lr="fast")),
        ErrorOptimizerInput("negative-L", ValueError, r"Invalid Lipschitz constant L: -1.0", kwargs=dict(L=-1.0)),
        ErrorOptimizerInput("nu-2", ValueError, r"Invalid nu: 2.0", kwargs=dict(nu=2.0)),
        ErrorOptimizerInput("ratio-bound-0", ValueError, r"Invalid a_k_ratio_upper_bound: 0.0",
                            kwargs=dict(a_k_ratio_upper_bound=0.0)),
        ErrorOptimizerInput("clipping_iter_start-0", ValueError, r"Invalid clipping_iter_start: 0",
                            kwargs=dict(clipping_iter_start=0)),
        ErrorOptimizerInput("sgd-only-momentum", TypeError, r"unexpected keyword argument 'momentum'",
                            kwargs=dict(momentum=0.9)),
        ErrorOptimizerInput("negative-L-in-a-param-group", ValueError, r"Invalid Lipschitz constant L: -1.0",
                            params=lambda a, b: [{"params": a}, {"params": b, "L": -1.0}]),
        ErrorOptimizerInput("group-lr-set-to-0", ValueError, r"Invalid learning rate: 0.0", S,
                            setup=_set_group("lr", 0.0), backends=NOT_TRITON),
        ErrorOptimizerInput("group-L-set-negative", ValueError, r"Invalid Lipschitz constant L: -1.0", S,
                            setup=_set_group("L", -1.0), backends=NOT_TRITON),
    ]


clipped_sstm_info = OptimizerInfo(
    optim_cls=ClippedSSTM,
    base_kwargs=dict(lr=0.5, L=2.0),
    optim_inputs_func=optim_inputs_func_clipped_sstm,
    optim_error_inputs_func=optim_error_inputs_func_clipped_sstm,
    error_base_kwargs=dict(clipping_type="auto_clip", p_autoclip=0.5),
    apply_oracle=sstm_apply_oracle,
    apply_cases=[
        ApplyCase(dict(clipping_type="no_clip"), "both", "no_clip-inf-and-nan"),
        ApplyCase(dict(clipping_type="no_clip", nu=0.5, a_k_ratio_upper_bound=0.6), "nan", "no_clip-nu0.5-nan"),
        ApplyCase(dict(clipping_type="norm", clipping_level=1.0), "inf", "norm-inf"),
        ApplyCase(dict(clipping_type="coordinate_wise", clipping_level=0.05), "both", "coordinate_wise-inf-and-nan"),
    ],
    threshold_oracle=sstm_threshold,
    tensor_lr=False,  # lr enters as a = 1 / lr in alpha_k, a host float
    # After a skipped step the host's k (the number of step() calls) is ahead of the device's, and
    # the backends take alpha_{k+1} (lr) and B / alpha_{k+1} (threshold) as host floats: the step
    # runs with the host's alpha and the device's ratio folded into the gradient scale (or z for
    # AutoClip), equal to the twin's up to float32 rounding (optim/sstm.py, ClippedSSTM._z_step).
    skip_continuation_rtol=1e-6,
    skip_continuation_reason="alpha of the unskipped count reaches the backends through a device-side rescale",
    # fixed: SSTM_SKIP (a skipped step still moved x, y, k and A_k); F2 (with zero gradients, z = y, the
    # y and x updates rounded 1 ulp away from y, so the parameters drifted)
)

# --------------------------------------------------------------------------------------------
# ClippedAdamW
# --------------------------------------------------------------------------------------------

ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")


def adamw_twin(groups, per_group_norm: bool = False) -> TorchTwin:
    return TorchTwin(torch.optim.AdamW, ADAMW_KEYS, groups, per_group_norm)


def adamw_apply_oracle(kwargs: dict, params0, grads_per_step):
    """torch.optim.AdamW after torch's clipping of each step's gradients."""
    return _apply_with_twin(adamw_twin, kwargs, params0, grads_per_step)


def optim_inputs_func_clipped_adamw(backend: str) -> List[OptimizerInput]:
    inputs = [
        OptimizerInput(dict(clipping_type="no_clip"), "no_clip"),
        OptimizerInput(dict(clipping_type="norm", clipping_level=3.0, weight_decay=0.1), "norm-wd", triton=True),
        OptimizerInput(dict(clipping_type="norm", clipping_level=3.0, amsgrad=True, maximize=True, betas=(0.8, 0.99)),
                       "norm-amsgrad-maximize"),
        OptimizerInput(dict(clipping_type="layer_wise", clipping_level=1.5, eps=1e-6), "layer_wise-eps"),
        OptimizerInput(dict(clipping_type="coordinate_wise", clipping_level=0.5, amsgrad=True),
                       "coordinate_wise-amsgrad", triton=True),
        OptimizerInput(dict(clipping_type="auto_clip", p_autoclip=0.5), "auto_clip"),
        OptimizerInput(dict(clipping_type="quadratic_rand_norm", clipping_level=15.0, beta=0.1), "quadratic_rand_norm"),
        OptimizerInput(dict(clipping_type=ClipMethod("layer", "auto", "linear"), p_autoclip=0.5, beta=0.1),
                       "layer+auto+linear"),
    ]
    return [i for i in inputs if i.triton] if backend == "triton" else inputs


def optim_error_inputs_func_clipped_adamw(backend: str) -> List[ErrorOptimizerInput]:
    S = ErrorOn.STEP
    return _common_error_inputs(backend) + [
        ErrorOptimizerInput("negative-lr", ValueError, r"Invalid learning rate: -0.1", kwargs=dict(lr=-0.1)),
        TENSOR_LR_TORCH_WORDING,
        ErrorOptimizerInput("beta1-1", ValueError, r"Invalid beta parameter at index 0: 1.0", kwargs=dict(betas=(1.0, 0.9))),
        ErrorOptimizerInput("beta2-negative", ValueError, r"Invalid beta parameter at index 1: -0.5",
                            kwargs=dict(betas=(0.9, -0.5))),
        ErrorOptimizerInput("negative-eps", ValueError, r"Invalid epsilon value: -1.0", kwargs=dict(eps=-1.0)),
        ErrorOptimizerInput("negative-weight_decay", ValueError, r"Invalid weight_decay value: -1.0",
                            kwargs=dict(weight_decay=-1.0)),
        ErrorOptimizerInput("clip_point-update", ValueError, r"Invalid clip_point value: 'update'",
                            kwargs=dict(clip_point="update")),
        ErrorOptimizerInput("sgd-only-momentum", TypeError, r"unexpected keyword argument 'momentum'",
                            kwargs=dict(momentum=0.9)),
        ErrorOptimizerInput("group-betas-set-bad", ValueError, r"Invalid beta parameter at index 1: 1.5", S,
                            setup=_set_group("betas", (0.9, 1.5)), backends=NOT_TRITON),
    ]


clipped_adamw_info = OptimizerInfo(
    optim_cls=ClippedAdamW,
    base_kwargs=dict(lr=0.05),
    optim_inputs_func=optim_inputs_func_clipped_adamw,
    optim_error_inputs_func=optim_error_inputs_func_clipped_adamw,
    error_base_kwargs=dict(clipping_type="auto_clip", p_autoclip=0.5, amsgrad=True),
    apply_oracle=adamw_apply_oracle,
    apply_cases=[
        ApplyCase(dict(clipping_type="no_clip", weight_decay=0.01), "nan", "no_clip-nan"),
        ApplyCase(dict(clipping_type="coordinate_wise", clipping_level=0.5, amsgrad=True), "nan",
                  "coordinate_wise-amsgrad-nan"),
    ],
    threshold_oracle=sgd_threshold,
    torch_twin=adamw_twin,
)

optim_db: List[OptimizerInfo] = [clipped_sgd_info, clipped_adamw_info, clipped_sstm_info]
