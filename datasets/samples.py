"""Sample datasets from data shipped inside scikit-learn (nothing is downloaded): digits
(8x8 images as 64 pixel columns), iris, wine, breast cancer."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import numpy as np
import pyarrow as pa

from mlbus.datasets.sources import InvalidDataset


class _Bunch(Protocol):
    """What scikit-learn's loaders return (a `Bunch`) that is used here."""

    data: np.ndarray
    target: np.ndarray
    feature_names: Iterable[str]


def _loader(name: str) -> Callable[[], _Bunch]:
    from sklearn import datasets as sk

    return {
        "digits": sk.load_digits,
        "iris": sk.load_iris,
        "wine": sk.load_wine,
        "breast_cancer": sk.load_breast_cancer,
    }[name]


SAMPLES = {
    "digits": "8x8 handwritten digits, 1797 rows, 64 pixel columns (0-16), label 0-9",
    "iris": "iris flowers, 150 rows, 4 measurements, label 0-2",
    "wine": "wine cultivars, 178 rows, 13 chemical measurements, label 0-2",
    "breast_cancer": "breast cancer diagnosis, 569 rows, 30 features, label 0-1",
}


def sample_table(name: str) -> pa.Table:
    """The sample as a table: one float32 column per feature (pixels p0..p63 for digits)
    and an int64 `label`."""
    if name not in SAMPLES:
        raise InvalidDataset(f"no sample {name!r}; samples: {', '.join(SAMPLES)}")
    bunch = _loader(name)()
    features = np.asarray(bunch.data, dtype=np.float32)
    if name == "digits":
        names = [f"p{i}" for i in range(features.shape[1])]
    else:
        names = [str(n).replace(" ", "_") for n in bunch.feature_names]
    columns: dict[str, np.ndarray] = {n: features[:, i] for i, n in enumerate(names)}
    columns["label"] = np.asarray(bunch.target, dtype=np.int64)
    return pa.table(columns)
