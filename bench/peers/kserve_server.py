"""KServe's Python model server (`kserve` package) serving bench/peers/heavy_model.py, run by
bench/serving_peers.py in the peers' environment: `python kserve_server.py PORT`.

The Open Inference Protocol at /v2/models/wide-cnn/infer. KServe's dynamic batching is not in
this package: its documentation ("Inference Batcher") switches it on in the InferenceService
(`spec.predictor.batcher`: maxBatchSize, maxLatency), which the KServe agent, a Go sidecar
beside the model server container in Kubernetes, implements. The Python server alone runs one
predict per request (here: a single uvicorn worker, as its default).
"""

from __future__ import annotations

import logging
import sys
import uuid
from pathlib import Path

import kserve
import numpy as np
import torch
from kserve import InferOutput, InferRequest, InferResponse

sys.path.insert(0, str(Path(__file__).resolve().parent))

import heavy_model

CLASSES = np.array([str(i) for i in range(heavy_model.N_CLASSES)], dtype=object)


class Heavy(kserve.Model):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.load()

    def load(self) -> bool:
        self.model = heavy_model.build()
        self.ready = True
        return self.ready

    async def predict(self, payload: InferRequest, headers: dict | None = None) -> InferResponse:
        x = torch.from_numpy(payload.inputs[0].as_numpy().astype(np.float32, copy=False))
        p = heavy_model.probabilities(self.model, x).numpy()
        label = InferOutput(name="label", shape=[len(p)], datatype="BYTES")
        label.set_data_from_numpy(CLASSES[p.argmax(axis=1)], binary_data=False)
        probs = InferOutput(name="probabilities", shape=list(p.shape), datatype="FP32")
        probs.set_data_from_numpy(p, binary_data=False)
        return InferResponse(
            model_name=self.name,
            infer_outputs=[label, probs],
            response_id=payload.id or str(uuid.uuid4()),
        )


if __name__ == "__main__":
    port = int(sys.argv[1])
    # No access log line per request (mlbus writes none either).
    logging.getLogger("uvicorn.access").disabled = True
    server = kserve.ModelServer(
        http_port=port, enable_grpc=False, workers=1, enable_latency_logging=False
    )
    server.start([Heavy("wide-cnn")])
