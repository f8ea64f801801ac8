"""Sample datasets from data shipped inside scikit-learn (nothing is downloaded): digits
(8x8 images as 64 pixel columns), digits_images (the same images as one [1, 8, 8] tensor
column), iris, wine, breast cancer, and diabetes (a regression target)."""

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
        "diabetes": sk.load_diabetes,
        "digits_images": sk.load_digits,
    }[name]


SAMPLES = {
    "digits": "8x8 handwritten digits, 1797 rows, 64 pixel columns (0-16), label 0-9",
    "iris": "iris flowers, 150 rows, 4 measurements, label 0-2",
    "wine": "wine cultivars, 178 rows, 13 chemical measurements, label 0-2",
    "breast_cancer": "breast cancer diagnosis, 569 rows, 30 features, label 0-1",
    "diabetes": "diabetes progression (regression), 442 rows, 10 features, label 25-346",
    "digits_images": "8x8 handwritten digits as one image tensor column [1, 8, 8], label 0-9",
}
#: One sample's shape of the digits_images tensor column (declared in its field metadata).
IMAGE_SHAPE = (1, 8, 8)


def sample_table(name: str) -> pa.Table:
    """The sample as a table: one float32 column per feature (pixels p0..p63 for digits)
    and an int64 `label`."""
    if name not in SAMPLES:
        raise InvalidDataset(f"no sample {name!r}; samples: {', '.join(SAMPLES)}")
    bunch = _loader(name)()
    features = np.asarray(bunch.data, dtype=np.float32)
    if name == "digits_images":
        return image_table(features, np.asarray(bunch.target, dtype=np.int64))
    if name == "digits":
        names = [f"p{i}" for i in range(features.shape[1])]
    else:
        names = [str(n).replace(" ", "_") for n in bunch.feature_names]
    columns: dict[str, np.ndarray] = {n: features[:, i] for i, n in enumerate(names)}
    # The diabetes target is a number (regression); the others are class indices.
    target = bunch.target.astype(np.float64 if name == "diabetes" else np.int64)
    columns["label"] = np.asarray(target)
    return pa.table(columns)


def image_table(
    pixels: np.ndarray, labels: np.ndarray, shape: tuple[int, ...] = IMAGE_SHAPE
) -> pa.Table:
    """Images as one fixed-size-list column `image` whose field metadata declares one
    sample's `shape` (the trainer feeds it as [N, *shape]), and an int64 `label`."""
    size = int(np.prod(shape))
    flat = pa.array(np.ascontiguousarray(pixels, dtype=np.float32).reshape(-1))
    image = pa.FixedSizeListArray.from_arrays(flat, size)
    field = pa.field("image", image.type, metadata={"shape": str(list(shape))})
    return pa.Table.from_arrays(
        [image, pa.array(labels, type=pa.int64())],
        schema=pa.schema([field, pa.field("label", pa.int64())]),
    )
