"""The model card: the JSON document stored beside an artifact's weights that says how to
rebuild the model (family, hyperparameters, input and output sizes) and how to feed it
(feature columns in order, their standardisation, the class labels), plus where it came
from (dataset version, run, metrics). The trainer writes it, `mlbus.artifacts` stores and
loads it, the model server and the workflow read it. Validated when it is built or loaded,
so a card that cannot describe a servable model is refused with the field that is wrong,
before anything uses it. No topics here.

Fields may be added (unknown ones are kept as they are, so an older reader loads a newer
card); none may be removed or retyped: every stored artifact's card must keep loading.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mlbus.errors import Invalid
from mlbus.ml.preprocessing import Standardisation
from mlbus.schemas.base import DatasetRef
from mlbus.schemas.training import FamilyOrigin, HyperValue, Task

Finite = Annotated[float, Field(allow_inf_nan=False)]


class InvalidModelCard(Invalid):
    """A model card that is not valid JSON or lacks or mistypes a field; the message names
    each wrong field."""


class ModelCard(BaseModel):
    """What `model_card.json` holds; the required fields are what loading, serving and
    re-evaluating a model need."""

    model_config = ConfigDict(frozen=True, extra="allow")

    family: str = Field(min_length=1, description="model family (mlbus.families) to build")
    hyperparameters: dict[str, HyperValue]
    features: list[str] = Field(min_length=1, description="input columns, in input order")
    classes: list[str] = Field(
        default=[], description="output class labels, in output order (classification: >= 2)"
    )
    mean: list[Finite] = Field(description="standardisation: one per feature")
    std: list[Annotated[Finite, Field(ge=0.0)]] = Field(description="one per feature")
    label: str = Field(min_length=1, description="the dataset's label column")
    feature_types: dict[str, str] | None = Field(default=None, description="Arrow type by column")
    metrics: dict[str, dict[str, float]] = {}
    dataset: DatasetRef | None = None
    run_id: str | None = None
    torch_version: str | None = None
    device: str | None = None
    weights_sha256: str | None = Field(default=None, description="set when the card is saved")
    task: Task | None = Field(default=None, description="None: classification")
    family_origin: FamilyOrigin | None = Field(
        default=None, description="the plugin family's distribution (None: built in)"
    )
    input_shape: list[Annotated[int, Field(ge=1)]] | None = Field(
        default=None,
        description="one sample's shape ([1, 8, 8] for a tensor column); None: [features]",
    )
    target_mean: Finite | None = Field(
        default=None, description="regression: the target's mean (predictions are scaled back)"
    )
    target_std: Annotated[Finite, Field(gt=0.0)] | None = Field(
        default=None, description="regression: the target's standard deviation"
    )

    @model_validator(mode="after")
    def _outputs(self) -> ModelCard:
        if self.task != "regression" and len(self.classes) < 2:
            raise ValueError(f"classes: a classifier needs at least 2, not {len(self.classes)}")
        return self

    @property
    def sample_shape(self) -> list[int]:
        """One sample's shape as a client sends it (after the batch dimension)."""
        return list(self.input_shape) if self.input_shape else [len(self.features)]

    @property
    def n_outputs(self) -> int:
        return 1 if self.task == "regression" else len(self.classes)

    @field_validator("mean", "std")
    @classmethod
    def _one_per_feature(cls, values: list[float], info: ValidationInfo) -> list[float]:
        features = info.data.get("features")  # absent when `features` itself is invalid
        if features is not None and len(values) != len(features):
            raise ValueError(f"{len(values)} values for {len(features)} features")
        return values

    @property
    def standardisation(self) -> Standardisation:
        """The preprocessing the model was trained with (built anew: keep it, do not call
        it per request)."""
        return Standardisation.from_lists(self.mean, self.std)

    @classmethod
    def from_json(cls, raw: bytes | str, *, source: str | None = None) -> ModelCard:
        """Parse and validate; `InvalidModelCard` naming every wrong field otherwise (and
        `source`, the card's URI, when given)."""
        where = f"model card {source}" if source else "model card"
        # The standard library's parser, as the card was written with: it reads the NaN a
        # metric of an empty split is.
        try:
            data: Any = json.loads(raw)
        except ValueError as e:
            raise InvalidModelCard(f"{where}: not JSON: {e}") from None
        if not isinstance(data, dict):
            raise InvalidModelCard(f"{where}: a JSON object expected, not {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise InvalidModelCard(f"{where}: {_problems(e)}") from None

    def to_json(self) -> bytes:
        """Indented, keys sorted (readable and diffable on the object store); optional fields
        that are None are left out, unknown fields kept."""
        return json.dumps(self.model_dump(exclude_none=True), indent=2, sort_keys=True).encode()


def _problems(error: ValidationError) -> str:
    """`std: 63 values for 64 features; family: Field required` (one per wrong field)."""
    parts = []
    for problem in error.errors(include_url=False):
        where = ".".join(str(p) for p in problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)  # a card-wide check names it
    return "; ".join(parts)
