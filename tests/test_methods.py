"""The method model: every name and alias parses to its triple (docs/spec.md section 1); other triples are valid."""

import pytest

import torch_clip_fused as tcf
from torch_clip_fused import ClipMethod, Randomization, Scope, Threshold, parse_method

SPEC_TABLE = [
    ("norm", "global", "constant", "none"),
    ("linear_rand_norm", "global", "constant", "linear"),
    ("quadratic_rand_norm", "global", "constant", "quadratic"),
    ("layer_wise", "layer", "constant", "none"),
    ("coordinate_wise", "coordinate", "constant", "none"),
    ("auto_clip", "global", "auto", "none"),
    ("linear_rand_autoclip", "global", "auto", "linear"),
    ("quadratic_rand_autoclip", "global", "auto", "quadratic"),
    ("linear_stoch_norm", "global", "constant", "linear"),
    ("quadratic_stoch_norm", "global", "constant", "quadratic"),
    ("linear_stoch_autoclip", "global", "auto", "linear"),
    ("quadratic_stoch_autoclip", "global", "auto", "quadratic"),
]


@pytest.mark.parametrize("name,scope,threshold,randomization", SPEC_TABLE)
def test_names_parse_to_spec_triples(name, scope, threshold, randomization):
    m = parse_method(name)
    assert (m.scope.value, m.threshold.value, m.randomization.value) == (scope, threshold, randomization)


def test_no_clip_has_no_scope():
    assert parse_method("no_clip").scope is None
    assert not parse_method("no_clip").clips


def test_any_other_triple_is_a_method():
    m = ClipMethod("layer", "auto", "quadratic")
    assert (m.scope, m.threshold, m.randomization) == (Scope.LAYER, Threshold.AUTO, Randomization.QUADRATIC)
    assert m.name == "layer+auto+quadratic"
    assert parse_method(m) is m
    assert ClipMethod("global", "auto", "none").name == "auto_clip"


BAD = [
    (lambda: parse_method("nrom"), ValueError, r"'nrom'.*norm, linear_rand_norm.*quadratic_stoch_autoclip"),
    (lambda: parse_method(3), ValueError, r"Invalid clipping_type: 3"),
    (lambda: ClipMethod("coordinate", "auto"), ValueError, r"'auto' cannot be combined with scope 'coordinate'"),
    (lambda: ClipMethod("tensor"), ValueError, r"Invalid clipping scope: 'tensor'.*'global', 'layer', 'coordinate'"),
    (lambda: ClipMethod("layer", "percentile"), ValueError, r"Invalid clipping threshold: 'percentile'"),
    (lambda: ClipMethod("layer", "auto", "cubic"), ValueError, r"Invalid clipping randomization: 'cubic'.*'quadratic'"),
]


@pytest.mark.parametrize("make,error,message", BAD)
def test_bad_methods_are_rejected(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_every_original_name_is_exported():
    assert set(tcf.CLIPPING_TYPES) == {
        "no_clip", "norm", "linear_rand_norm", "quadratic_rand_norm", "layer_wise", "coordinate_wise",
        "auto_clip", "linear_rand_autoclip", "quadratic_rand_autoclip",
    }


def _every_valid_method():
    """Every ClipMethod triple the constructor accepts, and no clipping."""
    methods = [ClipMethod(None)]
    for scope in Scope:
        for threshold in Threshold:
            for randomization in Randomization:
                try:
                    methods.append(ClipMethod(scope, threshold, randomization))
                except ValueError:
                    pass
    return methods


@pytest.mark.parametrize("method", _every_valid_method(), ids=repr)
def test_every_method_name_round_trips(method):
    """``name`` is accepted back as clipping_type: parse_method(m.name) == m for every valid triple."""
    assert parse_method(method.name) == method
    assert parse_method(method.name).name == method.name


@pytest.mark.parametrize("name", list(tcf.CLIPPING_TYPES) + ["zclip", "adagc", "agc"])
def test_named_methods_keep_their_names(name):
    assert parse_method(name).name == name


def test_triple_names_are_accepted_as_clipping_type():
    """The name of a triple without an original name configures an optimizer, as the triple does."""
    import torch

    from torch_clip_fused import ClippedSGD

    name = ClipMethod("layer", "auto", "quadratic").name
    p = torch.nn.Parameter(torch.ones(3))
    opt = ClippedSGD([p], lr=0.1, clipping_type=name)
    assert parse_method(opt.param_groups[0]["clipping_type"]) == ClipMethod("layer", "auto", "quadratic")
    # a triple spelled out that has an original name is that method
    assert parse_method("global+constant+none") == parse_method("norm")


BAD_TRIPLE_NAMES = [
    ("layer+auto", r"Invalid clipping_type: 'layer\+auto'.*scope\+threshold\+randomization"),
    ("layer+auto+quadratic+x", r"Invalid clipping_type: 'layer\+auto\+quadratic\+x'.*scope\+threshold\+randomization"),
    ("layer+auto+cubic", r"Invalid clipping_type: 'layer\+auto\+cubic'.*Invalid clipping randomization: 'cubic'"),
    ("tensor+constant+none", r"Invalid clipping_type: 'tensor\+constant\+none'.*Invalid clipping scope: 'tensor'"),
    ("coordinate+auto+none", r"'coordinate\+auto\+none'.*'auto' cannot be combined with scope 'coordinate'"),
    (" layer+auto+none", r"Invalid clipping_type: ' layer\+auto\+none'"),
]


@pytest.mark.parametrize("name,message", BAD_TRIPLE_NAMES, ids=[n for n, _ in BAD_TRIPLE_NAMES])
def test_bad_triple_names_are_clear_errors(name, message):
    with pytest.raises(ValueError, match=message):
        parse_method(name)
