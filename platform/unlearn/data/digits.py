"""scikit-learn's bundled `load_digits`: 1,797 8x8 grey images of 10 digits (nothing downloaded)."""

from __future__ import annotations

import numpy as np

from unlearn.data.base import ImageDataset, stratified_split

# Fixed grouping of digits into 5 superclasses by shared strokes (loops, verticals, curves, ...),
# so concept-level scenarios can be run on digits.
DIGIT_SUPERCLASSES = [[0, 6], [1, 7], [2, 5], [3, 8], [4, 9]]


def load_digits_dataset(test_fraction: float, seed: int) -> ImageDataset:
    """Digits as N x 1 x 8 x 8 in [0, 1], split stratified by class."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    tr, te = stratified_split(y, test_fraction, seed)
    superclass_of = np.zeros(10, dtype=np.int64)
    for s, members in enumerate(DIGIT_SUPERCLASSES):
        superclass_of[members] = s
    return ImageDataset(
        name="digits",
        x_train=x[tr], y_train=y[tr], x_test=x[te], y_test=y[te],
        class_names=[str(d) for d in range(10)],
        superclass_of=superclass_of,
        superclass_names=["-".join(map(str, g)) for g in DIGIT_SUPERCLASSES],
    )
