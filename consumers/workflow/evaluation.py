"""Re-evaluating the champion on a candidate's test rows, when the two were trained on
different data (a new dataset version, another seed or split): the policy then compares
both on the same rows. Loads the champion's artifact (`mlbus.artifacts`) and the
candidate's dataset version (`mlbus.tables.DatasetReader`, hash verified), rebuilds the
candidate's test split and applies the champion's own preprocessing (its model card's
feature list and standardisation). The split and the standardisation are the trainer's
own: both come from the kernel (`mlbus.ml.split`, `mlbus.ml.preprocessing`).
torch, numpy and pyarrow are imported at the first evaluation: the workflow manager idles
without them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from mlbus.errors import MlbusError
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.logview import dataset_versions
from mlbus.schemas.datasets import DatasetCreated
from mlbus.schemas.training import Split, TrainingCompleted
from mlbus.storage import ObjectStore

if TYPE_CHECKING:
    from mlbus.ml.card import ModelCard

log = logging.getLogger(__name__)


class ChampionEvaluator:
    """An `Evaluator` (policy.py): the champion's test.accuracy and test.loss (a regression
    model's test.rmse, test.mae, test.r2) on the candidate's test rows, or None when that
    cannot be done (logged)."""

    def __init__(self, kafka: KafkaConfig, store: ObjectStore) -> None:
        self.kafka = kafka
        self.store = store
        self.datasets = dataset_versions(kafka, name="workflow datasets")

    def close(self) -> None:
        """Stop the log view of `dataset.created` (the evaluator's owner calls this)."""
        self.datasets.close()

    def __call__(
        self, champion: TrainingCompleted, candidate: TrainingCompleted, split: Split
    ) -> dict[str, float] | None:
        try:
            return self._evaluate(champion, candidate, split)
        except (MlbusError, KeyError, ValueError, RuntimeError) as e:
            log.warning(
                "workflow: cannot re-evaluate %s %s on %s@%s: %s",
                champion.model,
                champion.version,
                candidate.dataset.name,
                candidate.dataset.version[:12],
                e,
            )
            return None

    @staticmethod
    def _feed(card: ModelCard) -> tuple[int, ...]:
        from mlbus.families import resolve

        return resolve(card.family).feed_shape(card.sample_shape)

    def _dataset(self, name: str, version: str) -> DatasetCreated:
        found = self.datasets.get((name, version))
        if found is None:
            raise MlbusError(f"dataset {name}@{version} is not in the log")
        return found.data

    def _evaluate(
        self, champion: TrainingCompleted, candidate: TrainingCompleted, split: Split
    ) -> dict[str, float]:
        import numpy as np
        import torch
        from torch import nn

        from mlbus import artifacts
        from mlbus.ml.split import split_indices
        from mlbus.ml.tensors import tensor_rows, tensor_shape
        from mlbus.tables import DatasetReader

        art = champion.artifact
        if art.model_card_uri is None:
            raise MlbusError("the champion's artifact has no model card")
        model, card = artifacts.load(self.store, art.uri, art.sha256, art.model_card_uri)
        data = self._dataset(candidate.dataset.name, candidate.dataset.version)
        features, label = card.features, card.label
        with DatasetReader(
            self.store, data.uri, data.content_hash, columns=[*features, label]
        ) as reader:
            table = reader.read_all()
        rows = split_indices(table.num_rows, candidate.seed, split.validation, split.test)["test"]
        if len(rows) == 0:
            raise MlbusError("the candidate's split has no test rows")
        shape = tensor_shape(table.schema, features)
        if shape:  # one tensor column, flat [rows, values]
            width = int(np.prod(shape))
            x = tensor_rows(table.column(features[0]), features[0], width, table.num_rows)
        else:
            x = np.stack([table.column(f).to_numpy(zero_copy_only=False) for f in features], axis=1)
        x = card.standardisation.apply(x[rows]).reshape(-1, *self._feed(card))
        raw = table.column(label).to_numpy(zero_copy_only=False)[rows]
        if card.task == "regression":
            with torch.no_grad():
                out = model(torch.from_numpy(x)).reshape(-1).double().numpy()
            predicted_values = out * (card.target_std or 1.0) + (card.target_mean or 0.0)
            truth = raw.astype(np.float64)
            error = predicted_values - truth
            total = float(((truth - truth.mean()) ** 2).sum())
            return {
                "test.rmse": float(np.sqrt((error**2).mean())),
                "test.mae": float(np.abs(error).mean()),
                "test.r2": 1.0 - float((error**2).sum()) / total if total > 0 else float("nan"),
            }
        index = {c: i for i, c in enumerate(card.classes)}
        y = np.array([index.get(str(v), -1) for v in raw], dtype=np.int64)
        with torch.no_grad():
            logits = model(torch.from_numpy(x))
        predicted = logits.argmax(dim=1).numpy()
        known = y >= 0  # a class the champion never saw is simply a wrong answer
        loss = (
            nn.functional.cross_entropy(logits[known], torch.from_numpy(y[known])).item()
            if known.any()
            else float("inf")
        )
        return {"test.accuracy": float((predicted == y).mean()), "test.loss": loss}
