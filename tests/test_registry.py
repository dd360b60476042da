"""One registry behind kernel generators, mixers, models and backends: registration order,
refusal of a taken name, one error text that lists the known names."""

from __future__ import annotations

import re

import pytest

from tokenmix._registry import Registry
from tokenmix.kernel_gen import create_kernel_gen, list_kernel_gens
from tokenmix.mixers import create_mixer, list_mixers
from tokenmix.models import create_model, list_models
from tokenmix.ops import get_backend, list_backends


def test_registration_order_first_and_overwrite():
    r = Registry("widget")
    a, b, c = object(), object(), object()
    assert r.register("a", a) is a
    r.register("b")(b)  # decorator form
    r.register("c", c, first=True)
    assert r.names() == ["c", "a", "b"]
    assert r.register("a", a) is a  # the same object again: nothing changes
    with pytest.raises(ValueError, match="widget 'a' is already registered .*overwrite=True"):
        r.register("a", b)
    r.register("a", b, overwrite=True)
    assert r.lookup("a") is b and r.names() == ["c", "b", "a"]
    with pytest.raises(ValueError, match=r"^unknown widget 'z'; known: c, b, a$"):
        r.lookup("z")
    with pytest.raises(ValueError, match="widget name must be a non-empty str"):
        r.register("", a)


@pytest.mark.parametrize("kind,names,make", [
    ("kernel generator", list_kernel_gens, lambda n: create_kernel_gen(n, 8)),
    ("mixer", list_mixers, lambda n: create_mixer(n, 8)),
    ("model", list_models, lambda n: create_model(n)),
    ("backend", list_backends, get_backend),
])
def test_every_kind_refuses_an_unknown_name_alike(kind, names, make):
    with pytest.raises(ValueError) as e:
        make("nope")
    assert str(e.value) == f"unknown {kind} 'nope'; known: {', '.join(names())}"


def test_models_list_by_family_then_depth():
    """The depth-numbered families (resnet50, rednet26, ...) list contiguously, by depth."""
    numbered = [n for n in list_models() if re.search(r"\d+$", n)]
    families = [re.sub(r"\d+$", "", n) for n in numbered]
    assert families == sorted(families, key=families.index)  # each family contiguous
    for fam in set(families):
        depths = [int(n[len(fam):]) for n in numbered if re.sub(r"\d+$", "", n) == fam]
        assert depths == sorted(depths), fam
