"""Forget scenarios produce the splits of METHODS.md's label-domain table."""

from __future__ import annotations

import numpy as np
import pytest

from unlearn.data.digits import DIGIT_SUPERCLASSES, load_digits_dataset
from unlearn.data.scenarios import make_splits
from unlearn.errors import SpecError
from unlearn.spec import ForgetSpec


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset(0.25, 0)


def _disjoint_cover(a: np.ndarray, b: np.ndarray, n: int) -> bool:
    return len(np.intersect1d(a, b)) == 0 and len(np.union1d(a, b)) == n


def test_class_forgetting(digits):
    s = make_splits(digits, ForgetSpec(kind="class", classes=[3, 5]), 0)
    assert s.label_level == "class" and s.num_outputs == 10
    assert set(np.unique(s.forget.y)) == {3, 5}
    assert not np.isin(s.retain.y, [3, 5]).any() and not np.isin(s.test.y, [3, 5]).any()
    assert _disjoint_cover(s.forget.index, s.retain.index, len(digits.y_train))
    assert np.array_equal(s.remain.index, s.retain.index) and np.array_equal(s.target.index, s.forget.index)


def test_random_forgetting_is_seeded_and_sized(digits):
    a = make_splits(digits, ForgetSpec(kind="random", fraction=0.1), 0)
    b = make_splits(digits, ForgetSpec(kind="random", fraction=0.1), 0)
    c = make_splits(digits, ForgetSpec(kind="random", fraction=0.1), 1)
    assert len(a.forget) == round(0.1 * len(digits.y_train))
    assert np.array_equal(a.forget.index, b.forget.index) and not np.array_equal(a.forget.index, c.forget.index)
    assert _disjoint_cover(a.forget.index, a.retain.index, len(digits.y_train))
    assert len(a.test) == len(digits.y_test)  # random forgetting excludes nothing from the test set
    assert len(np.unique(a.forget.y)) == 10


def test_concept_all_matched(digits):
    s = make_splits(digits, ForgetSpec(kind="concept", mismatch="all_matched", target=4), 0)
    assert s.label_level == "class" and set(np.unique(s.forget.y)) == {4}
    assert np.array_equal(s.target.index, s.forget.index)


def test_concept_target_mismatch(digits):
    """Model on classes, target = a superclass, given = one of its classes; retrain drops all of it."""
    sup = 1
    members = DIGIT_SUPERCLASSES[sup]
    s = make_splits(digits, ForgetSpec(kind="concept", mismatch="target", target=sup), 0)
    assert s.label_level == "class"
    assert set(np.unique(s.forget.y)) == {members[0]}
    assert set(np.unique(s.target.y)) == set(members)
    assert not np.isin(s.retain.y, members).any()
    assert np.isin(s.remain.y, members[1:]).any()  # the methods' stream still holds the rest of the concept
    assert _disjoint_cover(s.forget.index, s.remain.index, len(digits.y_train))
    assert not np.isin(s.test.y, members).any()


def test_concept_model_mismatch(digits):
    """Model on superclasses, target = one class; labels are superclass ids."""
    s = make_splits(digits, ForgetSpec(kind="concept", mismatch="model", target=7), 0)
    assert s.label_level == "superclass" and s.num_outputs == len(DIGIT_SUPERCLASSES)
    sup_of_7 = next(i for i, g in enumerate(DIGIT_SUPERCLASSES) if 7 in g)
    assert set(np.unique(s.forget.y)) == {sup_of_7}
    assert np.array_equal(s.target.index, s.forget.index)
    assert np.isin(s.retain.y, [sup_of_7]).any()  # the sibling class keeps the superclass alive
    assert s.target_labels == [sup_of_7]


def test_concept_data_mismatch_with_given(digits):
    s = make_splits(digits, ForgetSpec(kind="concept", mismatch="data", target=2, given=[5]), 0)
    assert s.label_level == "superclass"
    assert set(np.unique(s.forget.y)) == {2}
    assert np.array_equal(np.sort(digits.y_train[s.forget.index]), np.sort(digits.y_train[digits.y_train == 5]))
    assert not np.isin(s.retain.y, [2]).any()
    assert s.describe["given"] == [5] and s.describe["target_classes"] == [2, 5]


def test_bad_superclass_is_named(digits):
    with pytest.raises(SpecError, match="forget.target"):
        make_splits(digits, ForgetSpec(kind="concept", mismatch="data", target=9), 0)
