"""The inference log: a sample (serving.log_sample_rate) of answered requests, published to
`inference.logged` by a background thread, never on a request's critical path. A request
only offers its record to a bounded queue; when the queue is full the record is dropped and
counted (`mlbus_serve_inference_log_dropped`), so a slow broker never slows requests. While
the broker is away (the embedded one is being replaced, docs/broker.md "Broker loss"), the
producer's buffer holds up to serving.log_buffer_records records and the queue as many; past
that, and for records the producer gives up on, samples are dropped and counted the same way.
Delivery is at most once by design (a sample may be dropped, never sent twice: the producer
is idempotent); the log is a sample for metrics and drift, not an audit record.

Each record carries the raw per-sample feature vectors for drift (the stream processors
compute per-feature PSI against the training histograms of `dataset.created`). Every part of
a record is bounded, so that no record exceeds MAX_RECORD_BYTES, below the 1 MiB event limit
the stream processors read with (a larger record would be dead-lettered there, and its
sample lost from the metrics):
- wide inputs: when a model has more than MAX_FEATURES features, every k-th feature is
  logged (k = ceil(features / MAX_FEATURES)), and `feature_names` names exactly the logged
  ones, so PSI per feature still applies; feature names longer than NAMES_BYTES in all are
  not logged, nor the inputs;
- tall inputs: only the first rows of a batch, up to MAX_VALUES logged values in all, are
  kept in `inputs`; `batch_size` always covers the whole batch, and `predictions` too up to
  PREDICTION_BYTES of JSON (then the first rows);
- the request id is bounded where the request arrives (serving.max_request_id_bytes), and
  the error text is cut to MAX_ERROR_CHARS here;
- a record that still exceeds MAX_RECORD_BYTES (a promotion with a huge version string) is
  dropped and counted, never published.

The publisher writes each record's bytes with orjson straight from the numpy rows (`encode`)
instead of building the payload model and serializing it with pydantic, which took two
thirds of this thread's time for a 784-feature input and held the GIL that the event loop
and the forward threads wait for. `record` builds the same payload as a model; a property
test holds `encode` byte for byte to the codec's encoding of `record`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from mlbus.errors import MlbusError
from mlbus.kafka.producer import EventProducer
from mlbus.schemas.codec import attributes
from mlbus.schemas.serving import InferenceLogged
from mlbus.serving.metrics import ServingMetrics

log = logging.getLogger(__name__)

MAX_FEATURES = 1024
#: Input values logged per record: at most 25 bytes each in JSON (a float64 and its comma).
MAX_VALUES = 16_384
NAMES_BYTES = 64 * 1024
PREDICTION_BYTES = 256 * 1024
MAX_ERROR_CHARS = 1024
#: The largest record published: inputs (MAX_VALUES x 25 B) and their names, predictions,
#: an error of MAX_ERROR_CHARS (up to 6 B a character escaped), a bounded request id and the
#: envelope fit with room to spare.
MAX_RECORD_BYTES = 900 * 1024
QUEUE_SIZE = 10_000
#: After a burst's first sample the publisher sleeps this long, so that the samples of the
#: requests answered with it are queued and handled in one go (one poll, one GIL hand-off).
GATHER_SECONDS = 0.005
TOPIC = "inference.logged"
_OPTIONS = orjson.OPT_UTC_Z | orjson.OPT_SERIALIZE_NUMPY


@dataclass(frozen=True, slots=True)
class Sample:
    model: str
    version: str
    request_id: str
    latency_seconds: float
    ok: bool
    error: str | None
    predictions: np.ndarray | None  # class labels
    features: list[str]
    inputs: np.ndarray | None  # raw rows [batch, features]
    status: int | None = None  # a failure's HTTP status: 4xx the client's input, 5xx ours
    shadow: bool = False  # answered by a shadow candidate on a copy: never returned
    answered_by: str | None = None  # a shadow's: the version whose answer was returned
    agreement: float | None = None  # a shadow's: share of rows answered alike


class InferenceLog:
    """`offer()` from any thread or the event loop; `start()` / `close()` the publisher."""

    def __init__(
        self,
        producer: EventProducer,
        metrics: ServingMetrics,
        *,
        replica: str,
        sample_rate: float = 1.0,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        self.producer = producer
        self.topic = producer.kafka.topic(TOPIC) if producer is not None else TOPIC
        self.metrics = metrics
        self.replica = replica
        self.sample_rate = sample_rate
        self._queue: queue.Queue[Sample | None] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._random = random.Random()
        self.gather = GATHER_SECONDS

    def offer(self, sample: Sample) -> bool:
        """Queue `sample` if it is in the sample; False if it was left out or dropped."""
        if self.sample_rate < 1.0 and self._random.random() >= self.sample_rate:
            return False
        try:
            self._queue.put_nowait(sample)
            return True
        except queue.Full:
            self.metrics.log_dropped.inc()
            return False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mlbus-inference-log", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Publish what is queued (within `timeout`), then stop."""
        if self._thread is None:
            return
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        while True:
            try:
                # A sample wakes the thread at once; the timeout only paces the delivery
                # reports: every 100 ms while records are in flight, every second when
                # none are (a quiet server then wakes once a second, not ten times).
                first = self._queue.get(timeout=0.1 if self.producer.in_flight() else 1.0)
            except queue.Empty:
                self.producer.poll(0)  # delivery reports, in the background too
                self._count_undelivered()
                continue
            if self.gather and first is not None:
                time.sleep(self.gather)
            samples = [first]
            with contextlib.suppress(queue.Empty):  # at most a queue's worth: memory stays bounded
                while samples[-1] is not None and len(samples) < self._queue.maxsize:
                    samples.append(self._queue.get_nowait())
            for sample in samples:
                if sample is None:
                    break
                try:
                    value = encode(sample, self.replica, self.producer.source)
                    if len(value) > MAX_RECORD_BYTES:
                        self.metrics.log_dropped.inc()
                        log.warning(
                            "inference log: a %d-byte record of %s %s dropped (at most %d)",
                            len(value),
                            sample.model,
                            sample.version[:64],
                            MAX_RECORD_BYTES,
                        )
                        continue
                    # Never waits: while the broker is away the producer's bounded buffer
                    # fills, then samples are dropped and counted.
                    if self.producer.try_produce(self.topic, value, sample.model):
                        self.metrics.log_published.inc()
                    else:
                        self.metrics.log_dropped.inc()
                except MlbusError as e:
                    log.warning("inference log: sample lost: %s", e)
                except Exception:
                    log.exception("inference log: sample lost")
            # Delivery reports once per drained burst, not after each record: a poll per
            # record was a quarter of this thread's time, and each gave up the GIL.
            self.producer.poll(0)
            self._count_undelivered()
            if samples[-1] is None:
                break
        try:
            self.producer.flush(5.0)
        except MlbusError as e:
            log.warning("inference log: %s", e)

    def _count_undelivered(self) -> None:
        # Records librdkafka gave up on (the broker away past message.timeout.ms): dropped.
        lost = self.producer.discard_failed()
        if lost:
            self.metrics.log_dropped.inc(lost)
            log.warning("inference log: %d samples not delivered (the broker is away)", lost)


#: How long the inference log's producer holds records to send them in one request. The log
#: feeds 10 s metric windows, so a tenth of a second costs nothing there, and it turns a
#: produce request per answered request (each one work for the broker, on the cores the model
#: runs on) into a few requests a second.
LINGER_MS = 100


def producer_options(buffer_records: int) -> dict[str, int]:
    """The inference log producer's local buffer: at most `buffer_records` records (and
    64 MiB), so that a broker away for long costs bounded memory; records sent in batches
    (LINGER_MS)."""
    return {
        "queue.buffering.max.messages": buffer_records,
        "queue.buffering.max.kbytes": 64 * 1024,
        "linger.ms": LINGER_MS,
    }


def reduced(sample: Sample) -> tuple[list[str], np.ndarray] | None:
    """The logged feature names and input rows (C order) of a sample, reduced as the module
    doc says; None when the sample has no inputs. float32 rows (what every request becomes,
    serving/tensors.py) stay float32, so that each value is written as the shortest decimal
    that reads back as the float32 the model saw ("0.1", not the "0.10000000149011612" of
    its float64 widening): a third fewer bytes to encode, send and store."""
    if sample.inputs is None or not sample.inputs.size:
        return None
    x = sample.inputs
    names = sample.features
    if x.shape[1] > MAX_FEATURES:
        step = math.ceil(x.shape[1] / MAX_FEATURES)
        x = x[:, ::step]
        names = names[::step]
    # Escaped, a character takes at most 6 bytes; names this long are a card's mistake.
    if sum(len(n) for n in names) * 6 + 3 * len(names) > NAMES_BYTES:
        return None
    rows = max(1, MAX_VALUES // x.shape[1])
    dtype = np.float32 if x.dtype == np.float32 else np.float64
    return names, np.ascontiguousarray(x[:rows], dtype=dtype)


def predictions(sample: Sample) -> list[Any]:
    """The logged predictions: every row's label, or the first rows' up to PREDICTION_BYTES
    of JSON (the labels of a very large request)."""
    if sample.predictions is None:
        return []
    p = sample.predictions
    labels = p.tolist()
    # The common case, without encoding: an integer takes at most 21 bytes with its comma,
    # a string of n characters 6n + 3 (escaped, quoted, comma).
    most = 21 if p.dtype.kind in "iub" else p.itemsize // 4 * 6 + 3 if p.dtype.kind == "U" else 0
    if most and len(labels) * most <= PREDICTION_BYTES:
        return labels
    size = len(orjson.dumps(labels))
    if size <= PREDICTION_BYTES:
        return labels
    keep = len(labels) * PREDICTION_BYTES // size
    while keep and len(orjson.dumps(labels[:keep])) > PREDICTION_BYTES:  # uneven labels
        keep //= 2
    return labels[:keep]


def error_text(error: str | None) -> str | None:
    """The logged error text, cut to MAX_ERROR_CHARS (an error may quote what was sent)."""
    if error is None or len(error) <= MAX_ERROR_CHARS:
        return error
    return error[: MAX_ERROR_CHARS - 1] + "…"


def encode(sample: Sample, replica: str, source: str, **envelope: Any) -> bytes:
    """The record value of one sample: the `inference.logged` CloudEvent of `record(sample,
    replica)`, in the envelope `schemas.codec` gives every new event (its attributes, the
    payload last, absent fields left out), without building or validating the model.
    `envelope`: as for `schemas.codec.attributes` (a fixed id or time, in tests).

    Valid by construction: model, version and request id come from a verified deployment
    and a request already answered (or a generated id), the replica id is never empty, the
    latency is clamped at 0, names and rows are the card's and the model's input (finite:
    serving/tensors.py refuses NaN and infinities before a request reaches a model)."""
    data: dict[str, object] = {
        "request_id": sample.request_id,
        "model": sample.model,
        "version": sample.version,
        "replica": replica,
        "latency_seconds": max(0.0, sample.latency_seconds),
        "ok": sample.ok,
    }
    if sample.error is not None:
        data["error"] = error_text(sample.error)
    if sample.status is not None:
        data["status"] = sample.status
    data["batch_size"] = _batch_size(sample)
    data["predictions"] = predictions(sample)
    kept = reduced(sample)
    if kept is not None:
        data["feature_names"], data["inputs"] = kept
    if sample.shadow:
        data["shadow"] = True
        if sample.answered_by is not None:
            data["answered_by"] = sample.answered_by
        if sample.agreement is not None:
            data["agreement"] = sample.agreement
    envelope.setdefault("partitionkey", sample.model)
    event = attributes(TOPIC, source=source, **envelope)
    event["data"] = data
    return orjson.dumps(event, option=_OPTIONS)


def record(sample: Sample, replica: str) -> InferenceLogged:
    """The `inference.logged` payload of one sample as a model (what `encode` writes)."""
    names: list[str] | None = None
    inputs: list[list[float]] | None = None
    kept = reduced(sample)
    if kept is not None:
        # The values `encode` writes (float32 rows as their shortest decimals), as floats.
        names, inputs = kept[0], orjson.loads(orjson.dumps(kept[1], option=_OPTIONS))
    logged = InferenceLogged(
        request_id=sample.request_id,
        model=sample.model,
        version=sample.version,
        replica=replica,
        latency_seconds=max(0.0, sample.latency_seconds),
        ok=sample.ok,
        error=error_text(sample.error),
        status=sample.status,
        batch_size=_batch_size(sample),
        predictions=predictions(sample),
        shadow=True if sample.shadow else None,
        answered_by=sample.answered_by if sample.shadow else None,
        agreement=sample.agreement if sample.shadow else None,
    )
    if names is None:
        return logged
    # The feature names (from the card) and input rows (floats from numpy) are valid by
    # construction; validating them again was most of this function's time for wide models.
    return logged.model_copy(update={"feature_names": names, "inputs": inputs})


def _batch_size(sample: Sample) -> int:
    if sample.inputs is not None:
        return len(sample.inputs)
    return len(sample.predictions) if sample.predictions is not None else 0
