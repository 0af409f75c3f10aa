"""Every kernel variant the steps launch compiles with Triton's real compiler for an H100 (sm_90).

Triton's interpreter (how CI runs the kernels) accepts code the compiler rejects: a variable that
is a scalar on one branch and a block on the other, say.  So the launches of a set of steps are
recorded here (kernel, argument types, constexpr values, num_warps), and a subprocess without
``TRITON_INTERPRET`` compiles each distinct one to a cubin with ``triton.compile`` for
``GPUTarget("cuda", 90, 32)``: no GPU is needed for that.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import torch_clip_fused as tcf
from torch_clip_fused import ClipMethod, ClippedAdamW, ClippedSGD
from conftest import make_params

triton = pytest.importorskip("triton")

_TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16",
          torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
          torch.bool: "i1"}

STEP_CASES = [
    dict(clipping_type=name) for name in tcf.CLIPPING_TYPES
] + [
    dict(clipping_type=ClipMethod("layer", "auto", "linear")),
    dict(clipping_type=ClipMethod("layer", "constant", "quadratic")),
    dict(clipping_type=ClipMethod("coordinate", "constant", "linear")),
    dict(clipping_type="norm", momentum=0.9, nesterov=True, weight_decay=0.1, clip_point="update"),
    dict(clipping_type="layer_wise", momentum=0.9, dampening=0.5, maximize=True, nonfinite="apply"),
    dict(clipping_type="auto_clip", lr=torch.tensor(0.01)),
    dict(clipping_type="coordinate_wise", momentum=0.0, weight_decay=0.1),
    dict(clipping_type="coordinate_wise", momentum=0.9, stochastic_rounding=True),
    dict(clipping_type="zclip"),
    dict(clipping_type=ClipMethod("layer", "zscore", "linear"), zclip_warmup=1),
    dict(clipping_type="zclip", zclip_warmup=1, zclip_mode="percentile", zclip_skip_update_on_spike=True),
    dict(clipping_type="adagc", adagc_warmup=1),
    dict(clipping_type="agc", momentum=0.9),
    dict(clipping_type=ClipMethod("unit", "constant", "quadratic")),
    dict(clipping_type=ClipMethod("layer", "relative", "linear"), weight_decay=0.1),
    dict(clipping_type=ClipMethod("global", "relative")),
    # norm_type (kernels/norm_parts.py): NORM 1 (inf) and 2 (p)
    dict(clipping_type="norm", norm_type=float("inf")),
    dict(clipping_type="auto_clip", norm_type=3.0),
    dict(clipping_type="layer_wise", norm_type=1.0, momentum=0.9, clip_point="update"),
    dict(clipping_type=ClipMethod("layer", "zscore", "linear"), norm_type="inf", zclip_warmup=1),
]
#: ClippedAdamW steps (update code 2)
ADAMW_CASES = [
    dict(clipping_type="no_clip", nonfinite="apply"),
    dict(clipping_type="norm", amsgrad=True, weight_decay=0.0),
    dict(clipping_type="agc", maximize=True),
    dict(clipping_type="coordinate_wise", lr=torch.tensor(0.01)),
    dict(clipping_type="quadratic_rand_autoclip", amsgrad=True),
    dict(clipping_type=ClipMethod("unit", "relative", "linear")),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _signature(kernel, args, kwargs):
    """(signature, constexprs, options) of one launch, in ``triton.compile``'s terms."""
    fn = getattr(kernel, "fn", kernel)
    names = list(fn.arg_names) if hasattr(fn, "arg_names") else list(
        __import__("inspect").signature(getattr(fn, "fn", fn)).parameters)
    bound = dict(zip(names, args))
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    bound.update({k: v for k, v in kwargs.items() if k in names})
    signature, constexprs = {}, {}
    params = __import__("inspect").signature(getattr(fn, "fn", fn)).parameters
    for name in names:
        value = bound[name] if name in bound else params[name].default  # a constexpr left at its default
        annotation = params[name].annotation
        if "constexpr" in str(annotation):
            signature[name] = "constexpr"
            constexprs[name] = value if not hasattr(value, "name") else f"tl.{value.name}"
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"argument {name} of {fn}: {type(value)}")
    return dict(module=getattr(fn, "__module__", None) or fn.fn.__module__, name=fn.__name__,
                signature=signature, constexprs=constexprs, options=options)


@pytest.fixture
def recorded(monkeypatch):
    from torch_clip_fused.kernels import clip_apply, clip_norms, clip_scales

    launches = {}
    kernels = [clip_norms.clip_norm_kernel, clip_apply.clip_apply_kernel, clip_scales.clip_scale_kernel]
    for cls in {type(k) for k in kernels}:
        original = cls.run

        def run(self, *args, _original=original, **kwargs):
            record = _signature(self, args, kwargs)
            launches[json.dumps(record, sort_keys=True, default=str)] = record
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "run", run)
    return launches


def _compile_all(records):
    script = textwrap.dedent("""
        import importlib, json, sys
        import triton, triton.language as tl
        from triton.compiler import ASTSource
        from triton.backends.compiler import GPUTarget
        failures = []
        for r in json.load(sys.stdin):
            fn = getattr(importlib.import_module(r["module"]), r["name"])
            constexprs = {k: (tl.dtype(v[3:]) if isinstance(v, str) and v.startswith("tl.") else v)
                          for k, v in r["constexprs"].items()}
            try:
                triton.compile(ASTSource(fn, r["signature"], constexprs), target=GPUTarget("cuda", 90, 32),
                               options=r["options"])
            except Exception as err:
                failures.append(f"{r['name']} {r['constexprs']}: {type(err).__name__}: {str(err)[:1500]}")
        print(json.dumps(failures))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-c", script], input=json.dumps(list(records.values())), env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _given_sums_steps():
    """Steps of DTensor groups (a 1-rank gloo mesh) whose units' or weights' sums of squares are given to the
    backend (GroupTensors.given_sums), for each dtype."""
    import tempfile

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1)
        try:
            mesh = init_device_mesh("cpu", (1,))
            for dtype in DTYPES:
                for method in ("agc", ClipMethod("unit", "constant", "quadratic"), ClipMethod("layer", "relative")):
                    shapes = (((6, 4), Shard(1)), ((6,), Shard(0)))
                    params = [torch.nn.Parameter(distribute_tensor(torch.randn(s).to(dtype), mesh, [pl]))
                              for s, pl in shapes]
                    for p in params:
                        p.grad = distribute_tensor(torch.randn(p.shape).to(dtype), mesh, p.placements)
                    ClippedSGD(params, lr=0.1, clipping_type=method, backend="triton").step()
        finally:
            dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels compile in every Triton test")
def test_every_launched_kernel_compiles_for_sm90(recorded):
    for dtype in DTYPES:
        for case in STEP_CASES:
            params = make_params(dtype=dtype)
            opt = ClippedSGD(params, backend="triton", autoclip_history=8, **{"lr": 0.1, **case})
            opt.step()
            opt.step()
        for case in ADAMW_CASES:
            params = make_params(dtype=dtype)
            opt = ClippedAdamW(params, backend="triton", autoclip_history=8, **{"lr": 0.01, **case})
            opt.step()
            opt.step()
        params = make_params(dtype=dtype)
        opt = ClippedSGD(params, lr=0.1, momentum=0.9, clipping_type="auto_clip", backend="triton")
        opt.grad_scale, opt.found_inf = torch.tensor([4.0]), torch.tensor([0.0])  # as GradScaler sets them
        opt.step()
        params = make_params(dtype=dtype)
        tcf.clip_gradients_(params, "layer_wise", 1.0, backend="triton")
        norms = tcf.get_grad_norms(params, backend="triton")
        tcf.clip_grads_with_norms_(params, norms, "quadratic_rand_autoclip", backend="triton")
        tcf.clip_gradients_(params, "agc", backend="triton")
        norms = tcf.get_grad_norms(params, backend="triton", norm_type=3.0)
        tcf.clip_grads_with_norms_(params, norms, "layer_wise", backend="triton", norm_type=3.0)
    _given_sums_steps()  # clip_given_scale_kernel: unit scope and the relative threshold on DTensors
    assert any(r["name"] == "clip_given_scale_kernel" for r in recorded.values())
    assert len(recorded) >= 40, len(recorded)
    failures = _compile_all(recorded)
    assert not failures, f"{len(failures)} of {len(recorded)} variants fail; distinct errors:\n" + "\n\n".join(
        dict.fromkeys(f.split(": ", 1)[1] for f in failures))
