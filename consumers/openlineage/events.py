"""The log's events as OpenLineage run events (spec 2-0-2, `openlineage-python`'s model): a
pure mapping, so that the same event always maps to the same run events, byte for byte. The
service (service.py) feeds it the events of dataset.created, dataset.validated,
training.started/completed/failed, model.promoted and deployment.updated; it reads no topic.

Jobs and datasets live in one namespace (setting `openlineage.namespace`):
- dataset registration: job `register.<dataset>`, one run per dataset version (START on
  dataset.created, COMPLETE on dataset.validated); output `datasets/<dataset>` with the
  version, schema and column statistics;
- training: job `train.<model>`, one run per mlbus run id (START, COMPLETE or FAIL); input
  the dataset version with its schema and column statistics, output `models/<model>` at the
  version the run produced; parent run: `pipeline.<pipeline>` for a pipeline's requests;
- promotion: job `promote.<model>`: input the model version, output `champions/<model>`;
- deployment: job `deploy.<model>` (or `undeploy.<model>`), a run per deployment.updated.

Run ids are UUIDs derived (uuid5) from the namespace and mlbus's own ids (dataset version,
training run id, event id), event times are the events' own: a replay of the log yields
identical events, which lineage servers take as resends (runId + eventType identify them).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import (
    data_quality_metrics_input_dataset,
    dataset_version_dataset,
    documentation_dataset,
    error_message_run,
    job_type_job,
    output_statistics_output_dataset,
    parent_run,
    schema_dataset,
)
from openlineage.client.generated.base import DatasetFacet, InputDatasetFacet, RunFacet

from mlbus.schemas.base import DatasetRef
from mlbus.schemas.datasets import ColumnStats, DatasetCreated, DatasetValidated
from mlbus.schemas.envelope import Event
from mlbus.schemas.models import DeploymentUpdated, ModelPromoted
from mlbus.schemas.training import (
    TrainingCompleted,
    TrainingFailed,
    TrainingRequested,
    TrainingStarted,
)

#: Topics the mapping turns into run events.
MAPPED = (
    "dataset.created",
    "dataset.validated",
    "training.started",
    "training.completed",
    "training.failed",
    "model.promoted",
    "deployment.updated",
)
_INTEGRATION = "MLBUS"

D = TypeVar("D", InputDataset, OutputDataset)


@dataclass(frozen=True)
class Lookups:
    """What a mapping needs from other topics, each by its key (the service backs them with
    log indexes that catch up when a key is missing): the dataset version's announcement and
    validation, and a training request by event id."""

    created: Callable[[DatasetRef], Event[DatasetCreated] | None]
    validated: Callable[[DatasetRef], Event[DatasetValidated] | None]
    request: Callable[[str], Event[TrainingRequested] | None]


class Mapper:
    """Maps mlbus events to OpenLineage run events for `namespace`, as `producer` (a URI)."""

    def __init__(self, namespace: str, producer: str, lookups: Lookups) -> None:
        self.namespace = namespace
        self.producer = producer
        self.lookups = lookups

    def run_id(self, kind: str, key: str) -> str:
        """A UUID that is a function of the namespace, the kind of run and mlbus's key."""
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"mlbus:{self.namespace}:{kind}:{key}"))

    def map(self, event: Event, timestamp_ms: int | None = None) -> list[RunEvent]:
        """The run events of `event` (none for a type it does not map). `timestamp_ms`
        (the record's) dates an event that carries no `time`."""
        when = _time(event, timestamp_ms)
        data = event.data
        match data:
            case DatasetCreated():
                return [self._registration(RunState.START, data.name, data.version, when)]
            case DatasetValidated():
                return [self._registration(RunState.COMPLETE, data.name, data.version, when)]
            case TrainingStarted():
                return [
                    self._training(
                        RunState.START, data.run_id, data.model, when, data.dataset, data.request_id
                    )
                ]
            case TrainingCompleted():
                return [
                    self._training(
                        RunState.COMPLETE,
                        data.run_id,
                        data.model,
                        when,
                        data.dataset,
                        data.request_id,
                        version=data.version,
                    )
                ]
            case TrainingFailed():
                request = self.lookups.request(data.request_id)
                dataset = request.data.dataset if request else None
                return [
                    self._training(
                        RunState.FAIL,
                        data.run_id,
                        data.model,
                        when,
                        dataset,
                        data.request_id,
                        error=data,
                    )
                ]
            case ModelPromoted():
                return [self._promotion(event.id, data, when)]
            case DeploymentUpdated():
                return [self._deployment(event.id, data, when)]
        return []

    # -- runs --------------------------------------------------------------------------

    def _event(
        self,
        state: RunState,
        when: str,
        run_id: str,
        job: str,
        job_type: str,
        *,
        inputs: list[InputDataset] | None = None,
        outputs: list[OutputDataset] | None = None,
        run_facets: dict[str, RunFacet] | None = None,
    ) -> RunEvent:
        p = self.producer
        return RunEvent(
            eventType=state,
            eventTime=when,
            run=Run(runId=run_id, facets=run_facets or {}),
            job=Job(
                namespace=self.namespace,
                name=job,
                facets={
                    "jobType": job_type_job.JobTypeJobFacet(
                        processingType="BATCH",
                        integration=_INTEGRATION,
                        jobType=job_type,
                        producer=p,
                    )
                },
            ),
            inputs=inputs or [],
            outputs=outputs or [],
            producer=p,
        )

    def _registration(self, state: RunState, name: str, version: str, when: str) -> RunEvent:
        ref = DatasetRef(name=name, version=version)
        _, rows, size = self._stats(ref)
        statistics = output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
            rowCount=rows, size=size, producer=self.producer
        )
        output = OutputDataset(
            namespace=self.namespace,
            name=f"datasets/{name}",
            facets=self._dataset_facets(ref),
            outputFacets={"outputStatistics": statistics},
        )
        run_id = self.run_id("dataset", f"{name}@{version}")
        return self._event(
            state, when, run_id, f"register.{name}", "DATASET_REGISTRATION", outputs=[output]
        )

    def _training(
        self,
        state: RunState,
        run: str,
        model: str,
        when: str,
        dataset: DatasetRef | None,
        request_id: str,
        *,
        version: str | None = None,
        error: TrainingFailed | None = None,
    ) -> RunEvent:
        inputs = []
        if dataset is not None:
            facets, input_facets = self._input_facets(dataset)
            inputs.append(
                InputDataset(
                    namespace=self.namespace,
                    name=f"datasets/{dataset.name}",
                    facets=facets,
                    inputFacets=input_facets,
                )
            )
        outputs = []
        if version is not None:
            outputs.append(self._model(OutputDataset, f"models/{model}", version))
        run_facets: dict[str, RunFacet] = {}
        request = self.lookups.request(request_id)
        if request is not None and request.data.pipeline:
            pipeline = request.data.pipeline
            # One pipeline run per trigger: the requests one event caused (a sweep's points)
            # share it.
            trigger = request.causationid or request.id
            run_facets["parent"] = parent_run.ParentRunFacet(
                run=parent_run.Run(runId=self.run_id("pipeline", f"{pipeline}:{trigger}")),
                job=parent_run.Job(namespace=self.namespace, name=f"pipeline.{pipeline}"),
                producer=self.producer,
            )
        if error is not None:
            run_facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(
                # The log keeps the exception's class, not its stack trace.
                message=f"{error.error_type}: {error.reason}" if error.error_type else error.reason,
                programmingLanguage="python",
                producer=self.producer,
            )
        return self._event(
            state,
            when,
            self.run_id("training", run),
            f"train.{model}",
            "TRAINING",
            inputs=inputs,
            outputs=outputs,
            run_facets=run_facets,
        )

    def _promotion(self, event_id: str, data: ModelPromoted, when: str) -> RunEvent:
        return self._event(
            RunState.COMPLETE,
            when,
            self.run_id("promotion", event_id),
            f"promote.{data.model}",
            "PROMOTION",
            inputs=[self._model(InputDataset, f"models/{data.model}", data.version)],
            outputs=[self._model(OutputDataset, f"champions/{data.model}", data.version)],
        )

    def _deployment(self, event_id: str, data: DeploymentUpdated, when: str) -> RunEvent:
        state = RunState.FAIL if data.status == "failed" else RunState.COMPLETE
        job = "undeploy" if data.status == "unloaded" else "deploy"
        facets: dict[str, RunFacet] = {}
        if data.error:
            facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(
                message=data.error, programmingLanguage="python", producer=self.producer
            )
        return self._event(
            state,
            when,
            self.run_id("deployment", event_id),
            f"{job}.{data.model}",
            "DEPLOYMENT",
            inputs=[self._model(InputDataset, f"models/{data.model}", data.version)],
            run_facets=facets,
        )

    # -- datasets ----------------------------------------------------------------------

    def _model(self, kind: type[D], name: str, version: str) -> D:
        facets: dict[str, DatasetFacet] = {
            "version": dataset_version_dataset.DatasetVersionDatasetFacet(
                datasetVersion=version, producer=self.producer
            )
        }
        return kind(namespace=self.namespace, name=name, facets=facets)

    def _dataset_facets(self, ref: DatasetRef) -> dict[str, DatasetFacet]:
        p = self.producer
        facets: dict[str, DatasetFacet] = {
            "version": dataset_version_dataset.DatasetVersionDatasetFacet(
                datasetVersion=ref.version, producer=p
            )
        }
        created = self.lookups.created(ref)
        if created is not None:
            facets["schema"] = schema_dataset.SchemaDatasetFacet(
                fields=[
                    schema_dataset.SchemaDatasetFacetFields(name=c.name, type=c.type)
                    for c in created.data.arrow_schema
                ],
                producer=p,
            )
            if created.data.description:
                facets["documentation"] = documentation_dataset.DocumentationDatasetFacet(
                    description=created.data.description, producer=p
                )
        return facets

    def _input_facets(
        self, ref: DatasetRef
    ) -> tuple[dict[str, DatasetFacet], dict[str, InputDatasetFacet]]:
        facets = self._dataset_facets(ref)
        stats, rows, size = self._stats(ref)
        input_facets: dict[str, InputDatasetFacet] = {}
        if stats:
            input_facets["dataQualityMetrics"] = (
                data_quality_metrics_input_dataset.DataQualityMetricsInputDatasetFacet(
                    columnMetrics={name: _metrics(s) for name, s in stats.items()},
                    rowCount=rows,
                    bytes=size,
                    producer=self.producer,
                )
            )
        return facets, input_facets

    def _stats(self, ref: DatasetRef) -> tuple[dict[str, ColumnStats], int | None, int | None]:
        """Column statistics: the validation's (the drift baseline), else the announcement's."""
        created = self.lookups.created(ref)
        validated = self.lookups.validated(ref)
        rows = created.data.num_rows if created else validated.data.num_rows if validated else None
        size = created.data.num_bytes if created else None
        if validated is not None and validated.data.columns:
            return dict(validated.data.columns), rows, size
        if created is not None:
            return dict(created.data.columns), rows, size
        return {}, rows, size


def _metrics(stats: ColumnStats) -> data_quality_metrics_input_dataset.ColumnMetrics:
    return data_quality_metrics_input_dataset.ColumnMetrics(
        nullCount=stats.null_count,
        distinctCount=stats.distinct_count,
        min=_finite(stats.min),
        max=_finite(stats.max),
        quantiles=None,
    )


def _finite(value: float | None) -> float | None:
    # JSON has no NaN or infinity; the spec's number is finite.
    return value if value is not None and math.isfinite(value) else None


def _time(event: Event, timestamp_ms: int | None) -> str:
    if event.time is not None:
        when = event.time if event.time.tzinfo else event.time.replace(tzinfo=UTC)
    elif timestamp_ms is not None:
        when = datetime.fromtimestamp(timestamp_ms / 1000, UTC)
    else:  # neither: no time to be faithful to; the epoch keeps a replay identical
        when = datetime.fromtimestamp(0, UTC)
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")
