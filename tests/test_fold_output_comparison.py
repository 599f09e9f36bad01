"""The rule by which :func:`autonorm.fold_norms` decides that a fold left the model's output as
it was (``deploy._same``): tensors within the given tolerances, tuples and lists element by
element, dicts key by key, nested, anything else by ``==``. A wrong rule undoes good folds or
keeps a fold that changed what the model returns."""

from __future__ import annotations

import pytest
import torch

from autonorm.deploy import _same

T = torch.tensor


def same(a, b, rtol: float = 0.0, atol: float = 0.0) -> bool:
    return _same(a, b, rtol, atol)


def test_tensors_are_the_same_within_the_given_tolerances_only():
    assert same(T([1000.0]), T([1000.0]))
    assert same(T([1000.0]), T([1000.5]), rtol=1e-3)  # torch's own default rtol would refuse
    assert not same(T([1000.0]), T([1000.5]), rtol=1e-4)
    assert same(T([0.0]), T([0.5]), atol=1.0)
    assert not same(T([0.0]), T([0.5]), atol=0.1)


def test_tensors_of_different_shapes_differ_even_where_they_broadcast():
    assert not same(T([1.0, 1.0]), T([1.0]))
    assert not same(T([[1.0]]), T([1.0]))


@pytest.mark.parametrize("box", [tuple, list])
def test_sequences_are_compared_element_by_element_with_the_same_tolerances(box):
    a = box([T([1000.0]), (T([0.0]), 3)])
    close = box([T([1003.0]), (T([0.5]), 3)])
    assert same(a, close, rtol=1e-2, atol=0.6)
    assert not same(a, close, rtol=1e-2, atol=0.1)  # the nested tensor is too far
    assert not same(a, close, rtol=1e-3, atol=0.6)  # the first tensor is too far
    assert not same(a, box([T([1000.0]), (T([0.0]), 4)]), rtol=1e-2, atol=0.6)
    assert same(box([T([1.0]), 2]), [T([1.0]), 2])  # a tuple and a list alike


def test_sequences_of_different_lengths_differ():
    assert not same((T([1.0]),), (T([1.0]), T([1.0])))
    assert not same([1, 2], [1, 2, 3])


def test_dicts_are_compared_key_by_key_with_the_same_tolerances():
    a = {"logits": T([1000.0]), "aux": {"features": T([0.0]), "n": 3}}
    close = {"logits": T([1003.0]), "aux": {"features": T([0.5]), "n": 3}}
    assert same(a, close, rtol=1e-2, atol=0.6)
    assert not same(a, close, rtol=1e-2, atol=0.1)  # the nested tensor is too far
    assert not same(a, close, rtol=1e-3, atol=0.6)  # the logits are too far
    assert not same({"logits": T([1.0])}, {"scores": T([1.0])})
    assert not same({"a": 1, "b": 2}, {"a": 1, "b": 3})


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (3, 3, True),
        (3, 4, False),
        ("ab", "ab", True),  # strings are compared whole, not as sequences
        ("ab", "ba", False),
        (None, None, True),
        ((1, 2), 5, False),  # a sequence and a plain value
        (5, (1, 2), False),
        ({"a": 1}, 1, False),
        (1, {"a": 1}, False),
        (T(1.0), 1.0, True),  # a 0-d tensor against a number: by ==
        (1.0, T(1.0), True),
        (T(1.0), 2.0, False),
    ],
)
def test_anything_else_is_compared_by_equality(a, b, expected):
    assert same(a, b) is expected
