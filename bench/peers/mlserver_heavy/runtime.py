"""Seldon's MLServer serving bench/peers/heavy_model.py: a custom runtime (MLModel), run by
bench/serving_peers.py with `mlserver start` on this folder in the peers' environment.

Its adaptive batching (MLServer docs, "Adaptive Batching") is switched on per model in
model-settings.json, which bench/serving_peers.py writes: `max_batch_size` and
`max_batch_time` (seconds); MLServer concatenates the requests along their first dimension,
calls predict once, and splits the response back.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec, StringCodec
from mlserver.types import InferenceRequest, InferenceResponse

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import heavy_model

CLASSES = np.array([str(i) for i in range(heavy_model.N_CLASSES)], dtype=object)


class Heavy(MLModel):
    async def load(self) -> bool:
        self.model = heavy_model.build()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        p = heavy_model.probabilities(self.model, torch.from_numpy(x)).numpy()
        labels = [str(c) for c in CLASSES[p.argmax(axis=1)]]
        return InferenceResponse(
            model_name=self.name,
            outputs=[
                StringCodec.encode_output("label", labels),
                NumpyCodec.encode_output("probabilities", p),
            ],
        )
