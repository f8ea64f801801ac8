"""A trainer worker as a non-zero rank of a `workers: N` run (trainer/rendezvous.py finds
the run): reads the same validated data as rank 0, resumes from the run's checkpoint and
trains in the process group. Publishes nothing: rank 0 owns the run's events."""

from __future__ import annotations

from typing import Any

from mlbus.families import hyperparameters, resolve
from mlbus.schemas.training import TrainingRequested
from mlbus.storage import ObjectStore
from mlbus.tables import DatasetReader
from mlbus.trainer import checkpoint
from mlbus.trainer.data import load_arrays, prepare
from mlbus.trainer.distributed import fit_distributed
from mlbus.trainer.training import use_threads


def train_member(
    store: ObjectStore, plan: dict[str, Any], rank: int, world: int, *, torch_threads: int = 0
) -> None:
    """Train `plan`'s run as member `rank` of `world` (the group is formed already), on
    `torch_threads` intra-op threads (0: torch's default)."""
    use_threads(torch_threads)
    request = TrainingRequested.model_validate(plan["request"])
    features, label = list(plan["features"]), str(plan["label"])
    data = plan["data"]
    with DatasetReader(
        store, data["uri"], data["content_hash"], columns=[*features, label]
    ) as reader:
        x, labels = load_arrays(
            reader, num_rows=reader.num_rows, features=features, label=label, shape=plan["shape"]
        )
    prepared = prepare(
        x,
        labels,
        features=features,
        label=label,
        seed=request.seed,
        validation=request.split.validation,
        test=request.split.test,
        task=plan["task"],
        input_shape=plan["shape"],
        feed_shape=plan["feed_shape"],
    )
    # The family as installed here: a plugin of another version refuses, as in rank 0.
    origin = resolve(request.family, request.family_origin).origin
    # Rank 0 wrote this checkpoint before announcing the run: every member resumes equal.
    resume = checkpoint.load(store, plan["run_id"], plan["identity"])
    fit_distributed(
        prepared,
        request.family,
        hyperparameters(request.family, request.hyperparameters),
        max_epochs=request.max_epochs,
        seed=request.seed,
        early_stopping=request.early_stopping,
        resume=resume,
        device=plan["device"],
        loss=request.loss,
        origin=origin,
    )
