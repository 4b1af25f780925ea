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


def test_the_validation_split_is_held_out_of_the_test_part_and_leaves_the_members_alone(digits):
    plain = make_splits(digits, ForgetSpec(kind="class", classes=[3]), 0)
    s = make_splits(digits, ForgetSpec(kind="class", classes=[3]), 0, validation_fraction=0.2)
    assert len(plain.validation) == 0 and len(s.validation) > 0
    assert len(np.intersect1d(s.validation.index, s.test.index)) == 0  # disjoint from the reported test split
    assert np.array_equal(np.union1d(s.validation.index, s.test.index), plain.test.index)  # together: the old test
    assert not np.isin(s.validation.y, [3]).any()
    for name in ("train", "forget", "retain", "remain", "target"):  # members unchanged (and the original's data)
        assert np.array_equal(getattr(s, name).index, getattr(plain, name).index), name
    again = make_splits(digits, ForgetSpec(kind="class", classes=[3]), 0, validation_fraction=0.2)
    assert np.array_equal(again.validation.index, s.validation.index)
    tuning = s.for_tuning()
    assert tuning.test is s.validation and tuning.retain is s.retain
    with pytest.raises(SpecError, match="eval.validation_fraction"):
        plain.for_tuning()


def _concept_job(tmp_path, methods, **forget):
    from unlearn import spec as spec_mod

    return spec_mod.validate({
        "name": "told", "dataset": {"name": "digits"}, "model": {"name": "mlp", "hidden": [16]},
        "forget": {"kind": "concept", "mismatch": "target", "target": 3, **forget},  # as digits-concept-target
        "methods": methods, "ray": {"enabled": False}, "cache_dir": str(tmp_path / "cache")})


def test_methods_are_told_the_concept_only_where_the_spec_says(tmp_path):
    """forget.concept_known (or a method entry's own) decides whether CURE's methods get the concept's classes."""
    from unlearn.job import prepare

    methods = [{"name": "grogu"}, {"name": "gsr", "label": "gsr-told", "concept_known": True}]
    prep = prepare(_concept_job(tmp_path, methods))
    hidden = sorted(set(prep.splits.target_labels) - set(np.unique(prep.splits.forget.y).tolist()))
    assert hidden  # target mismatch: the concept has classes the forget set does not show
    assert prep.methods[0].params.mask_classes is None
    assert prep.methods[1].params.mask_classes == prep.splits.target_labels
    everyone = prepare(_concept_job(tmp_path, methods[:1], concept_known=True))
    assert everyone.methods[0].params.mask_classes == prep.splits.target_labels
    with pytest.raises(SpecError, match=r"methods\.0\.params\.mask_classes.*not told"):
        prepare(_concept_job(tmp_path, [{"name": "grogu", "params": {"mask_classes": hidden}}]))
