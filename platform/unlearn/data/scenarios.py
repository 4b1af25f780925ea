"""Forget scenarios: class, random, and concept under label-domain mismatch (TARF's four cases).

| mismatch    | model trained on | target concept  | forget data given        |
| all_matched | classes          | a class         | all of that class        |
| target      | classes          | a superclass    | one (or some) of its classes |
| model       | superclasses     | one class       | all of that class        |
| data        | superclasses     | a superclass    | one (or some) of its classes |

Methods see `forget` (the given data) and `remain` (the rest of the training set, which in the
target/data cases still holds part of the target concept). Retrain sees `retain` (training data
outside the whole target concept). FA and MIA are measured on `target`, RA on `retain`, TA on
`test` outside the target.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from unlearn.data.base import ImageDataset
from unlearn.errors import SpecError
from unlearn.spec import ForgetSpec


class Rows(Protocol):
    """Where a split's images are read from: `read(row_ids)` gives float32 N x C x H x W images."""

    def read(self, rows: np.ndarray) -> np.ndarray: ...


class ArrayRows:
    """Images held in memory, addressed by row id (row id = position in the array)."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = x

    def read(self, rows: np.ndarray) -> np.ndarray:
        return self.x[np.asarray(rows, dtype=np.int64)]


class StoreRows:
    """Rows of one part ('train' or 'test') of a Parquet row store, read on demand (workers read their own)."""

    def __init__(self, store: Any, part: str) -> None:
        self.store, self.part = store, part

    def read(self, rows: np.ndarray) -> np.ndarray:
        return self.store.read(self.part, np.asarray(rows, dtype=np.int64))


class Split:
    """Labels and row ids of a subset of a dataset's train or test part; images only when someone asks.

    The driver plans with labels and row ids alone; `x` is read from `rows` on first use and is never
    pickled with the split when it can be read again (workers get the light split and read their rows).
    """

    def __init__(self, x: np.ndarray | None, y: np.ndarray, index: np.ndarray, rows: Rows | None = None,
                 name: str = "") -> None:
        self.name = name  # the split's name in SPLIT_NAMES, where it has one
        self.y = np.asarray(y)
        self.index = np.asarray(index)  # row ids in the dataset's train (or test) part
        self._x = x
        self.rows = rows if rows is not None else _PositionalRows(self)

    @property
    def x(self) -> np.ndarray:
        if self._x is None:
            self._x = np.asarray(self.rows.read(self.index), dtype=np.float32)
        return self._x

    def __len__(self) -> int:
        return len(self.y)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if not isinstance(self.rows, _PositionalRows):
            state["_x"] = None  # readable again from `rows`: travel light
        return state


class _PositionalRows:
    """The rows of a split built from arrays in memory (tests, benchmarks): row id -> its position."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def read(self, rows: np.ndarray) -> np.ndarray:
        index = self.split.index
        order = np.argsort(index, kind="stable")
        return self.split._x[order[np.searchsorted(index, np.asarray(rows), sorter=order)]]


@dataclass
class Splits:
    label_level: str  # "class" | "superclass"
    num_outputs: int
    train: Split  # all training data: the original model's
    forget: Split  # D_f as handed to the methods
    remain: Split  # train minus forget: the methods' retain stream
    retain: Split  # train minus the whole target concept: retrain's data, RA
    target: Split  # all training data of the target concept: FA, MIA
    test: Split  # test data outside the target concept and the validation rows: TA (reported)
    validation: Split  # held-out test rows outside the target concept: what tuning reads instead of `test`
    target_labels: list[int]  # model-level labels the target concept occupies (empty for random)
    describe: dict[str, Any] = field(default_factory=dict)
    # dataset.backdoor: the reported test rows of the other classes with the trigger stamped, labelled with the
    # backdoor's target (its accuracy is the attack success rate); None for clean data
    triggered: Split | None = None

    def __post_init__(self) -> None:
        for name in SPLIT_NAMES:  # each split knows its name (streamed data is keyed on it)
            split = getattr(self, name)
            if split is not None:
                split.name = split.name or name

    def sizes(self) -> dict[str, int]:
        return {"forget": len(self.forget), "retain": len(self.retain), "test": len(self.test),
                "remain": len(self.remain), "target": len(self.target), "validation": len(self.validation)}

    def for_tuning(self) -> "Splits":
        """The splits a search scores on: the validation rows stand in for the test split everywhere (TA, MIA
        non-members, KL), so nothing selected by tuning ever read the reported test split."""
        if not len(self.validation):
            raise SpecError("eval.validation_fraction", "tuning needs a validation split: set it above 0")
        return replace(self, test=self.validation)


class SplitsRecipe:
    """How to rebuild a job's splits (dataset, forget spec, seed): what travels to workers instead of the
    splits' row ids, so the job a driver ships does not grow with the dataset. `make_splits` is
    deterministic, so every worker rebuilds exactly the driver's splits (from the store's labels)."""

    def __init__(self, dataset: Any, forget: ForgetSpec, seed: int, validation_fraction: float = 0.0) -> None:
        self.dataset, self.forget, self.seed = dataset, forget, seed
        self.validation_fraction = validation_fraction
        self._splits: Splits | None = None

    def splits(self) -> "Splits":
        if self._splits is None:
            self._splits = make_splits(self.dataset, self.forget, self.seed, self.validation_fraction)
        return self._splits

    def split(self, name: str) -> Split:
        """A split by name (`forget`, `remain`, `retain`, `train`, `target`, `test`, or `empty`)."""
        splits = self.splits()
        if name == "empty":
            return Split(None, splits.train.y[:0], splits.train.index[:0], splits.train.rows, name="empty")
        return getattr(splits, name)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_splits": None}


SPLIT_NAMES = ("forget", "remain", "retain", "train", "target", "test", "validation", "triggered")


def _take(rows: Rows, y: np.ndarray, mask: np.ndarray) -> Split:
    idx = np.flatnonzero(mask)
    return Split(None, y[idx], idx, rows)


def _labels_and_rows(ds: Any) -> tuple[np.ndarray, np.ndarray, Rows, Rows]:
    """(train labels, test labels, train rows, test rows) of an in-memory dataset or a Parquet row store."""
    if hasattr(ds, "labels"):  # RowStore: labels only; images stay in the store
        return ds.labels("train"), ds.labels("test"), StoreRows(ds, "train"), StoreRows(ds, "test")
    return ds.y_train, ds.y_test, ArrayRows(ds.x_train), ArrayRows(ds.x_test)


def _check_classes(ds: ImageDataset, classes: list[int], field_name: str) -> None:
    bad = [c for c in classes if not 0 <= c < ds.num_classes]
    if bad:
        raise SpecError(field_name, f"class {bad[0]} is not in dataset '{ds.name}' (classes are 0..{ds.num_classes - 1})")


def validation_rows(n_test: int, fraction: float, seed: int) -> np.ndarray:
    """Which rows of the test part are held out for validation (a mask): a seeded random `fraction` of them,
    drawn apart from the forget set's draw, so the members side (and the original's cache key) is unchanged."""
    mask = np.zeros(n_test, dtype=bool)
    mask[np.random.default_rng([seed, 0x5A11D]).permutation(n_test)[:int(round(fraction * n_test))]] = True
    return mask


def make_splits(ds: ImageDataset, spec: ForgetSpec, seed: int, validation_fraction: float = 0.0) -> Splits:
    """Build every split a job needs from a dataset (or its row store: labels only) and a forget spec;
    `validation_fraction` of the test part becomes the validation split (see `validation_rows`)."""
    cls_train, cls_test, train_rows, test_rows = _labels_and_rows(ds)
    sup_train, sup_test = ds.superclass_of[cls_train], ds.superclass_of[cls_test]
    describe: dict[str, Any] = {"kind": spec.kind}

    if spec.kind in ("class", "random") or spec.mismatch in ("all_matched", "target"):
        level, labels_train, labels_test, n_out = "class", cls_train, cls_test, ds.num_classes
    else:
        level, labels_train, labels_test, n_out = "superclass", sup_train, sup_test, ds.num_superclasses

    if spec.kind == "class":
        if spec.fraction is not None:  # a seeded share of the classes (TOFU's forget01 / 05 / 10 over entities)
            describe["fraction"] = spec.fraction
            spec = spec.model_copy(update={"classes": drawn_classes(cls_train, ds.num_classes, spec.fraction, seed)})
        _check_classes(ds, spec.classes, "forget.classes")
        # A dataset may have classes without images (imagefolder sized to a pretrained model's classes): none of
        # them can be forgotten, the methods would be handed nothing of it while FA still read its samples.
        empty = [c for c in spec.classes if not np.any(cls_train == c)]
        if empty:
            raise SpecError("forget.classes", f"class {empty[0]} has no training images in dataset '{ds.name}'")
        given = np.isin(cls_train, spec.classes)
        target_train, target_test = given, np.isin(cls_test, spec.classes)
        target_labels = list(spec.classes)
        describe["classes"] = list(spec.classes)
    elif spec.kind == "backdoor":
        given = _backdoor_forget(ds, spec, seed, describe)
        target_train, target_test = given, np.zeros(len(cls_test), dtype=bool)
        target_labels = []
    elif spec.kind == "random":
        rng = np.random.default_rng(seed)
        n_forget = int(round(spec.fraction * len(cls_train)))
        if n_forget == 0:
            raise SpecError("forget.fraction", f"{spec.fraction} of {len(cls_train)} training samples is an empty forget set")
        given = np.zeros(len(cls_train), dtype=bool)
        given[rng.choice(len(cls_train), n_forget, replace=False)] = True
        target_train, target_test = given, np.zeros(len(cls_test), dtype=bool)
        target_labels = []
        describe.update(fraction=spec.fraction, seed=seed)
    else:
        given, target_train, target_test, target_labels = _concept(ds, spec, cls_train, cls_test, describe, seed)

    if not given.any():
        raise SpecError("forget", "the forget set is empty (no training sample matches the forget spec)")
    if target_train.all():
        raise SpecError("forget", "the forget spec covers the whole training set: nothing would be retained")
    held_out = validation_rows(len(labels_test), validation_fraction, seed)
    splits = Splits(
        label_level=level,
        num_outputs=n_out,
        train=Split(None, labels_train, np.arange(len(labels_train)), train_rows),
        forget=_take(train_rows, labels_train, given),
        remain=_take(train_rows, labels_train, ~given),
        retain=_take(train_rows, labels_train, ~target_train),
        target=_take(train_rows, labels_train, target_train),
        test=_take(test_rows, labels_test, ~target_test & ~held_out),
        validation=_take(test_rows, labels_test, ~target_test & held_out),
        target_labels=target_labels,
        describe=describe,
        triggered=_triggered(ds, test_rows, labels_test, held_out),
    )
    if len(np.unique(splits.retain.y)) < 2 and n_out > 1:
        raise SpecError("forget", "fewer than two labels remain after forgetting: nothing meaningful to retain")
    return splits


def drawn_classes(cls_train: np.ndarray, num_classes: int, fraction: float, seed: int) -> list[int]:
    """`fraction` of all classes (at least one), drawn from those with training rows: one seeded permutation cut
    at the count, so the draws of one seed are nested (TOFU's forget01 inside forget05 inside forget10; TOFU
    counts the share on every entity, held-out ones included, as this does on every class)."""
    count = share_count(fraction, num_classes)
    trained = np.unique(cls_train)
    if count >= len(trained):
        raise SpecError("forget.fraction", f"{fraction} of {num_classes} classes ({count}) leaves no class with "
                                           f"training rows to retain ({len(trained)} have some)")
    return seeded_subset(trained, count, seed, 0xF0E7)


def validation_classes(splits: Splits, num_classes: int, fraction: float, seed: int) -> list[int]:
    """A forget set of OTHER classes to tune on (`fraction` of all classes, counted as `drawn_classes` counts):
    drawn from the classes of the retain split, so the job's target concept (its forget set included) is in none
    of it and nothing a search selects has read the reported forget set. Tune on
    `forget: {kind: class, classes: <these>}`; the job's own forget classes are then retained data there."""
    count = share_count(fraction, num_classes)
    kept = np.unique(splits.retain.y)
    if count >= len(kept):
        raise SpecError("forget.fraction", f"a validation forget set of {count} classes leaves none of the "
                                           f"{len(kept)} retained classes to retain")
    return seeded_subset(kept, count, seed, 0x5A11D)


def share_count(fraction: float, n: int) -> int:
    """How many of `n` a share `fraction` picks: rounded, at least one."""
    return max(1, int(round(fraction * n)))


def seeded_subset(pool: Any, count: int, seed: int, stream: int) -> list[int]:
    """`count` ids of `pool`, sorted: one permutation from (seed, stream) cut at the count, so the draws of one seed
    and stream are nested as the count grows, and different streams of one seed do not correlate."""
    return sorted(int(c) for c in np.random.default_rng([seed, stream]).permutation(np.asarray(pool))[:count])


def _backdoor_forget(ds: Any, spec: ForgetSpec, seed: int, describe: dict[str, Any]) -> np.ndarray:
    """The poisoned training rows handed to the methods: all of them, or a seeded `fraction` of them."""
    from unlearn.data.backdoor import backdoor_of

    trigger, poisoned = backdoor_of(ds)
    if trigger is None:
        raise SpecError("forget.kind", "backdoor forgetting needs a backdoored dataset (set dataset.backdoor)")
    given = np.array(poisoned, dtype=bool, copy=True)
    if spec.fraction is not None:
        rows = np.flatnonzero(poisoned)
        keep = np.random.default_rng([seed, 0xF0F]).choice(rows, max(1, int(round(spec.fraction * len(rows)))),
                                                           replace=False)
        given[:] = False
        given[keep] = True
    describe.update(target=int(trigger["target"]), poisoned=int(poisoned.sum()), forgotten=int(given.sum()))
    return given


def _triggered(ds: Any, test_rows: Rows, labels_test: np.ndarray, held_out: np.ndarray) -> Split | None:
    """The `triggered` evaluation split of a backdoored dataset (None for clean data)."""
    from unlearn.data.backdoor import TriggeredRows, backdoor_of

    trigger, _ = backdoor_of(ds)
    if trigger is None:
        return None
    idx = np.flatnonzero((labels_test != trigger["target"]) & ~held_out)
    return Split(None, np.full(len(idx), trigger["target"], dtype=np.int64), idx,
                 TriggeredRows(test_rows, trigger["patch"], trigger["value"]), name="triggered")


def _target_id(ds: Any, spec: ForgetSpec) -> int:
    """The concept target's id; a name is looked up among the superclass names (target / data mismatch) or the
    class names (all_matched / model)."""
    if not isinstance(spec.target, str):
        return int(spec.target)
    names = ds.superclass_names if spec.mismatch in ("target", "data") else ds.class_names
    if spec.target not in names:
        level = "superclass" if spec.mismatch in ("target", "data") else "class"
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise SpecError("forget.target", f"{level} {spec.target!r} is not in dataset '{ds.name}' ({shown})")
    return names.index(spec.target)


def _concept(ds: ImageDataset, spec: ForgetSpec, cls_train: np.ndarray, cls_test: np.ndarray,
             describe: dict[str, Any], seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """(given mask, target mask train, target mask test, target labels) of a concept scenario."""
    t = _target_id(ds, spec)
    describe.update(mismatch=spec.mismatch, target=t)
    if spec.mismatch in ("all_matched", "model"):
        _check_classes(ds, [t], "forget.target")
        target_classes = [t]
        given_classes = spec.given or [t]
        target_labels = [t] if spec.mismatch == "all_matched" else [int(ds.superclass_of[t])]
    else:
        if not 0 <= t < ds.num_superclasses:
            raise SpecError("forget.target", f"superclass {t} is not in dataset '{ds.name}' (superclasses are 0..{ds.num_superclasses - 1})")
        target_classes = ds.classes_of(t)
        given_classes = spec.given or target_classes[:1]
        target_labels = target_classes if spec.mismatch == "target" else [t]
    if spec.given_fraction is not None:  # a seeded share of the concept's classes (with training rows)
        members = [c for c in target_classes if np.any(cls_train == c)]
        given_classes = seeded_subset(members, share_count(spec.given_fraction, len(members)), seed, 0xC0C)
    _check_classes(ds, given_classes, "forget.given")
    outside = sorted(set(given_classes) - set(target_classes))
    if outside:
        raise SpecError("forget.given", f"classes {outside} are not part of the target concept (its classes: {target_classes})")
    describe["given"] = list(given_classes)
    describe["target_classes"] = list(target_classes)
    return (np.isin(cls_train, given_classes), np.isin(cls_train, target_classes),
            np.isin(cls_test, target_classes), target_labels)
