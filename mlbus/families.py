"""Model families, by name: the trainer builds a family's module to train it, the model
server builds the same module to load an artifact's weights into (so both live in the
kernel). A family turns one sample's input shape, the number of outputs and the request's
hyperparameters into a torch module, and declares the tasks it can learn.

Where families come from:
- built in: `mlp` (tabular) and `cnn` (square grey images, as pixel columns or a tensor);
- an installed distribution's entry point in the group `mlbus.families` (the entry point's
  name is the family's name; it points at a `Family` or at a build callable);
- for quick work, a `module:callable` reference used as the family name.
A plugin family carries its `FamilyOrigin` (distribution, version, digest of its source):
requests and model cards record it, and a model server refuses a model whose family's
distribution is not installed, or is installed at another version (`FamilyUnavailable`).

A built-in family (and one registered with `@family`) is given rows flattened to
[batch, features] and `n_features` as an int; a plugin family is given one sample's shape
(`(1, 8, 8)`) and batches of that shape ([batch, 1, 8, 8]).

torch is imported when a module is built, not with this module: the API and the workflow
manager check hyperparameters against the families without paying torch's memory at idle.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from mlbus.errors import Invalid
from mlbus.schemas.training import FamilyOrigin, Task

if TYPE_CHECKING:
    from torch import nn

#: The entry-point group an installed distribution declares its families in.
GROUP = "mlbus.families"
TASKS = ("classification", "regression")
#: Metrics the trainer reports per split, by task (policies may compare only these).
TASK_METRICS = {
    "classification": ("loss", "accuracy"),
    "regression": ("loss", "rmse", "mae", "r2"),
}


class InvalidModelSpec(Invalid):
    """A model that can never be built (unknown family, bad hyperparameters, a family that
    fails to import or to build, an unsupported task): not retryable."""


class FamilyUnavailable(InvalidModelSpec):
    """The family a model needs is not installed here, or from another version of its
    distribution: a model server refuses the model (the previous version keeps serving)."""


@dataclass(frozen=True)
class Family:
    """A model family. `build(input_shape, n_outputs, hyperparameters) -> nn.Module`; with
    `shaped=False` (built-ins) `input_shape` is given as the int feature count instead."""

    name: str
    build: Callable[[Any, int, Mapping[str, Any]], nn.Module]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    description: str = ""
    tasks: tuple[str, ...] = ("classification",)
    shaped: bool = True
    origin: FamilyOrigin | None = None

    def feed_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of one sample as the module receives it."""
        shape = tuple(int(d) for d in input_shape)
        return shape if self.shaped else (math.prod(shape),)


#: Built-in and `@family`-registered families; plugins are resolved into `_PLUGINS`.
FAMILIES: dict[str, Family] = {}
_PLUGINS: dict[str, Family] = {}


def family(
    name: str,
    *,
    defaults: Mapping[str, Any],
    bounds: Mapping[str, tuple[float, float]],
    description: str,
    tasks: Sequence[str] = ("classification",),
) -> Callable[[Callable[[int, int, Mapping[str, Any]], nn.Module]], Callable[..., nn.Module]]:
    """Register an in-process family: `build(n_features, n_outputs, hyperparameters)`."""

    def register(
        build: Callable[[int, int, Mapping[str, Any]], nn.Module],
    ) -> Callable[..., nn.Module]:
        FAMILIES[name] = Family(
            name, build, dict(defaults), dict(bounds), description, tuple(tasks), shaped=False
        )
        return build

    return register


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=GROUP)}


def available() -> list[str]:
    """Every family name known here: built in, registered, and declared by entry points."""
    return sorted(set(FAMILIES) | set(_entry_points()))


def _source_digest(module_name: str) -> str | None:
    """sha256 over the source files of the top-level package of `module_name` (one file
    for a plain module), in path order: what changes when the family's code changes."""
    top = sys.modules.get(module_name.partition(".")[0])
    where = getattr(top, "__file__", None)
    if where is None:
        return None
    path = Path(where)
    files = sorted(path.parent.rglob("*.py")) if path.name == "__init__.py" else [path]
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(path.parent)).encode() + b"\0")
        digest.update(f.read_bytes())
    return "sha256:" + digest.hexdigest()


def _as_family(name: str, obj: Any, origin: FamilyOrigin) -> Family:
    """A `Family` from what an entry point or reference points at: a `Family` (renamed to
    how it is asked for) or a build callable with optional `defaults`, `bounds`, `tasks`,
    `description` attributes."""
    if isinstance(obj, Family):
        return dataclasses.replace(obj, name=name, origin=origin)
    if not callable(obj):
        raise InvalidModelSpec(
            f"family {name!r}: {origin.reference} is a {type(obj).__name__}, not a Family or a "
            "build callable"
        )
    tasks = tuple(getattr(obj, "tasks", ("classification",)))
    return Family(
        name,
        obj,
        dict(getattr(obj, "defaults", {})),
        dict(getattr(obj, "bounds", {})),
        str(getattr(obj, "description", "") or (obj.__doc__ or "").strip().split("\n")[0]),
        tasks,
        True,
        origin,
    )


def _load(name: str) -> Family | None:
    """The plugin family `name` (an entry point's name or `module:callable`), or None if
    no such entry point is installed. An import that fails is an `InvalidModelSpec`."""
    if name in _PLUGINS:
        return _PLUGINS[name]
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attribute.split("."):
                obj = getattr(obj, part)
        except Exception as e:  # whatever the user's module raises while importing
            raise InvalidModelSpec(
                f"family {name!r} cannot be imported: {type(e).__name__}: {e}"
            ) from None
        dists = metadata.packages_distributions().get(module_name.partition(".")[0], [])
        dist = dists[0] if dists else None
        origin = FamilyOrigin(
            reference=name,
            distribution=dist,
            version=metadata.version(dist) if dist else None,
            digest=_source_digest(module_name),
        )
    else:
        ep = _entry_points().get(name)
        if ep is None:
            return None
        try:
            obj = ep.load()
        except Exception as e:  # a plugin that does not import: named, with its reason
            dist_name = ep.dist.name if ep.dist else "?"
            raise InvalidModelSpec(
                f"family {name!r} (entry point {ep.value} of {dist_name}) fails to import: "
                f"{type(e).__name__}: {e}"
            ) from None
        origin = FamilyOrigin(
            reference=ep.value,
            distribution=ep.dist.name if ep.dist else None,
            version=ep.dist.version if ep.dist else None,
            digest=_source_digest(ep.module),
        )
    found = _as_family(name, obj, origin)
    for task in found.tasks:
        if task not in TASKS:
            raise InvalidModelSpec(
                f"family {name!r} declares task {task!r}; tasks are {', '.join(TASKS)}"
            )
    _PLUGINS[name] = found
    return found


def resolve(name: str, origin: FamilyOrigin | None = None) -> Family:
    """The family `name`. With `origin` (a request's or a model card's), the installed
    family must come from the same distribution at the same version (`FamilyUnavailable`)."""
    found = FAMILIES.get(name) or _load(name)
    if found is None:
        if origin is not None and origin.distribution:
            raise FamilyUnavailable(
                f"model family {name!r} needs distribution {origin.distribution} "
                f"{origin.version}, which is not installed here"
            )
        raise InvalidModelSpec(f"unknown model family {name!r}; known: {', '.join(available())}")
    if origin is not None and origin.distribution:
        have = found.origin
        if have is None or (have.distribution, have.version) != (
            origin.distribution,
            origin.version,
        ):
            here = f"{have.distribution} {have.version}" if have else "a built-in family"
            raise FamilyUnavailable(
                f"model family {name!r} needs distribution {origin.distribution} "
                f"{origin.version}; this process has {here}"
            )
    return found


def task_of(name: str, task: str | None) -> str:
    """The task a request trains: `task` if the family supports it, else its first."""
    spec = resolve(name)
    if task is None:
        return spec.tasks[0] if spec.tasks else "classification"
    if task not in spec.tasks:
        raise InvalidModelSpec(
            f"family {name!r} does not support task {task!r}; it supports {', '.join(spec.tasks)}"
        )
    return task


def check_request(
    name: str, task: str | None, given: Mapping[str, Any]
) -> tuple[Task, FamilyOrigin | None]:
    """What the API and the CLI check before publishing a training request: the family
    imports, supports the task, and takes these hyperparameters. Returns the task and the
    family's origin, which the request records."""
    spec = resolve(name)
    chosen = cast("Task", task_of(name, task))  # one of TASKS: checked when resolved
    hyperparameters(name, given)
    return chosen, spec.origin


def hyperparameters(name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The family's defaults overridden by `given`, checked against its bounds."""
    spec = resolve(name)
    common = {"lr": 1e-3, "batch_size": 64, "weight_decay": 0.0}
    bounds = {"lr": (1e-6, 1.0), "batch_size": (1, 65536), "weight_decay": (0.0, 1.0)}
    merged = common | dict(spec.defaults)
    bounds |= spec.bounds
    unknown = sorted(set(given) - set(merged))
    if unknown:
        raise InvalidModelSpec(
            f"hyperparameter {unknown[0]!r} is not one of {name}'s: {', '.join(sorted(merged))}"
        )
    for key, value in given.items():
        low, high = bounds.get(key, (-math.inf, math.inf))
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            raise InvalidModelSpec(
                f"hyperparameter {key}={value!r} is out of range [{low:g}, {high:g}]"
            )
        merged[key] = type(merged[key])(value) if isinstance(merged[key], int) else float(value)
    return merged


def build(
    name: str,
    input_shape: int | Sequence[int],
    n_outputs: int,
    params: Mapping[str, Any],
    *,
    origin: FamilyOrigin | None = None,
) -> nn.Module:
    """The family's module for samples of `input_shape` (an int: that many features) and
    `n_outputs` outputs. A build that raises, or returns something that is not a torch
    module, is an `InvalidModelSpec` naming the family."""
    from torch import nn

    spec = resolve(name, origin)
    shape = (input_shape,) if isinstance(input_shape, int) else tuple(input_shape)
    argument: Any = math.prod(shape) if not spec.shaped else shape
    try:
        module = spec.build(argument, n_outputs, params)
    except InvalidModelSpec:
        raise
    except Exception as e:  # the family's own code: any error is the family's
        raise InvalidModelSpec(
            f"family {name!r} failed to build for input {list(shape)}: {type(e).__name__}: {e}"
        ) from None
    if not isinstance(module, nn.Module):
        raise InvalidModelSpec(
            f"family {name!r} returned a {type(module).__name__}, not a torch.nn.Module"
        )
    return module


@family(
    "mlp",
    defaults={"hidden": 128, "layers": 2, "dropout": 0.1},
    bounds={"hidden": (1, 8192), "layers": (1, 16), "dropout": (0.0, 0.9)},
    description="multi-layer perceptron for tabular data",
    tasks=("classification", "regression"),
)
def _mlp(n_features: int, n_classes: int, p: Mapping[str, Any]) -> nn.Module:
    from torch import nn

    layers: list[nn.Module] = []
    width = n_features
    for _ in range(int(p["layers"])):
        layers += [nn.Linear(width, int(p["hidden"])), nn.ReLU(), nn.Dropout(float(p["dropout"]))]
        width = int(p["hidden"])
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


@functools.cache
def _image_cnn() -> type[nn.Module]:
    import torch
    from torch import nn

    class ImageCNN(nn.Module):
        def __init__(self, side: int, n_classes: int, channels: int, dropout: float) -> None:
            super().__init__()
            self.side = side
            self.features = nn.Sequential(
                nn.Conv2d(1, channels, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(channels, channels * 2, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(channels * 2, channels * 4, 3, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(2),
            )
            self.head = nn.Sequential(
                nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels * 4 * 4, n_classes)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x.view(-1, 1, self.side, self.side)))

    return ImageCNN


@family(
    "cnn",
    defaults={"channels": 16, "dropout": 0.1},
    bounds={"channels": (1, 512), "dropout": (0.0, 0.9)},
    description="small CNN for square grey images given as pixel columns (8x8, 28x28)",
    tasks=("classification", "regression"),
)
def _cnn(n_features: int, n_classes: int, p: Mapping[str, Any]) -> nn.Module:
    side = math.isqrt(n_features)
    if side * side != n_features or side < 4:
        raise InvalidModelSpec(
            f"cnn needs square images as pixel columns; {n_features} features is not a square"
        )
    return _image_cnn()(side, n_classes, int(p["channels"]), float(p["dropout"]))
