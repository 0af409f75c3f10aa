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
