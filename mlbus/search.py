"""Hyperparameter search spaces: reading a space file (`lr: {type: float, low: 1e-4, high:
0.1, log: true}`) and checking a `search.requested` before it is published, so a space that
can never be sampled (empty, low above high, a log scale with a non-positive bound, a name
the family does not have) or a budget of zero fails here with the line to fix, not in the
tuning service. Shared by the CLI, the API and the workflow's pipeline definitions.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import ValidationError

from mlbus.errors import Invalid
from mlbus.families import InvalidModelSpec, hyperparameters, resolve
from mlbus.schemas.search import Param, SearchRequested
from mlbus.schemas.training import FamilyOrigin, HyperValue, run_id_for

#: Points of a grid search at most (each one is a whole training run).
MAX_GRID = 10_000

_TRIALS = uuid.UUID("6b1f3a52-8f0e-4d0a-9d3c-3c8f5d1e7a21")


class InvalidSearch(Invalid):
    """A search that can never run as given: an empty or contradictory space, a budget of
    zero, a hyperparameter the family does not have."""


def trial_request_id(search_id: str, number: int) -> str:
    """The event id of trial `number`'s `training.requested`: the same however often the
    tuning service decides to request it (a restart never publishes a trial twice)."""
    return str(uuid.uuid5(_TRIALS, f"{search_id}/trial/{number}"))


def trial_run_id(search_id: str, number: int) -> str:
    return run_id_for(trial_request_id(search_id, number))


def new_search_id() -> str:
    return str(uuid.uuid4())


def parse_space(raw: Any, *, where: str = "space") -> dict[str, Param]:
    """A space from its YAML text or mapping: `name: {type, low, high, log, step, choices}`."""
    if isinstance(raw, str):
        try:
            raw = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise InvalidSearch(f"{where}: not YAML: {e}") from None
    if not raw:
        raise InvalidSearch(f"{where}: the search space is empty: name at least one hyperparameter")
    if not isinstance(raw, Mapping):
        raise InvalidSearch(f"{where}: a mapping of hyperparameter: {{type, low, high, ...}}")
    space: dict[str, Param] = {}
    for name, spec in raw.items():
        if not isinstance(spec, Mapping):
            raise InvalidSearch(f"{where}.{name}: a mapping such as {{type: float, low, high}}")
        try:
            space[str(name)] = Param.model_validate(dict(spec))
        except ValidationError as e:
            first = e.errors()[0]
            at = ".".join(str(p) for p in first["loc"])
            raise InvalidSearch(f"{where}.{name}.{at}: {first['msg']}") from None
    return space


def check_param(name: str, p: Param, family: str) -> None:
    """One dimension, checked alone and against the family's bounds."""
    at = f"space.{name}"
    if p.type == "categorical":
        if not p.choices:
            raise InvalidSearch(f"{at}: a categorical needs a non-empty list of choices")
        if p.low is not None or p.high is not None or p.log:
            raise InvalidSearch(f"{at}: a categorical takes choices, not low/high/log")
        for choice in p.choices:
            _in_family(at, family, name, choice)
        return
    if p.choices:
        raise InvalidSearch(f"{at}: a {p.type} range takes low/high, not choices")
    if p.low is None or p.high is None:
        raise InvalidSearch(f"{at}: a {p.type} range needs both low and high")
    if not (math.isfinite(p.low) and math.isfinite(p.high)):
        raise InvalidSearch(f"{at}: low and high must be finite")
    if p.low > p.high:
        raise InvalidSearch(f"{at}: low ({p.low:g}) is above high ({p.high:g})")
    if p.log and p.low <= 0:
        raise InvalidSearch(f"{at}: a log scale needs low > 0 (got {p.low:g})")
    if p.log and p.step is not None:
        raise InvalidSearch(f"{at}: a log scale takes no step")
    if p.type == "int" and (p.low != int(p.low) or p.high != int(p.high)):
        raise InvalidSearch(f"{at}: an int range needs whole bounds")
    for bound in (p.low, p.high):
        _in_family(at, family, name, int(bound) if p.type == "int" else float(bound))


def _in_family(at: str, family: str, name: str, value: HyperValue) -> None:
    try:
        hyperparameters(family, {name: value})
    except InvalidModelSpec as e:
        raise InvalidSearch(f"{at}: {e}") from None


def check_search(request: SearchRequested) -> FamilyOrigin | None:
    """Everything that can be known before the search is published. Returns the family's
    origin (None: built in), which the request records as its trials' do."""
    try:
        origin = resolve(request.family, request.family_origin).origin
    except InvalidModelSpec as e:
        raise InvalidSearch(str(e)) from None
    if not request.space:
        raise InvalidSearch("the search space is empty: name at least one hyperparameter")
    if request.trials < 1:
        raise InvalidSearch("a budget of zero trials: ask for at least one")
    both = sorted(set(request.space) & set(request.hyperparameters))
    if both:
        raise InvalidSearch(f"{both[0]!r} is both searched and fixed: keep one")
    for name, p in request.space.items():
        check_param(name, p, request.family)
    try:
        hyperparameters(request.family, request.hyperparameters)
    except InvalidModelSpec as e:
        raise InvalidSearch(f"hyperparameters: {e}") from None
    if request.sampler == "grid":
        size = math.prod(len(v) for v in grid(request.space).values())
        if size > MAX_GRID:
            raise InvalidSearch(f"the grid has {size} points, over {MAX_GRID}")
    return origin


def grid(space: Mapping[str, Param]) -> dict[str, list[HyperValue]]:
    """The points of each dimension for the grid sampler: the choices, every int of a
    range (by its step), or a float range's points by its step (which a grid needs)."""
    axes: dict[str, list[HyperValue]] = {}
    for name, p in space.items():
        if p.type == "categorical":
            axes[name] = list(p.choices or [])
            continue
        assert p.low is not None and p.high is not None
        if p.type == "float" and p.step is None:
            raise InvalidSearch(
                f"space.{name}: a grid search needs a step for a float range (or choices)"
            )
        step = p.step or 1
        count = math.floor((p.high - p.low) / step + 1e-9) + 1
        if count > MAX_GRID:
            raise InvalidSearch(f"space.{name}: {count} points, over {MAX_GRID}")
        points = [p.low + i * step for i in range(count)]
        axes[name] = [int(v) for v in points] if p.type == "int" else list(points)
    return axes
