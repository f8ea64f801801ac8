"""LitServe serving bench/peers/heavy_model.py, run by bench/serving_peers.py in the peers'
environment: `python litserve_server.py PORT MAX_BATCH BATCH_TIMEOUT_S`.

LitServe's dynamic batching (its docs, "Batching"): `max_batch_size` and `batch_timeout` on the
LitAPI; the requests gathered within the timeout go to `batch()` (stacked here), one forward
pass, and `unbatch()` hands each its row. It has no Open Inference Protocol: its native JSON
API is a route of any JSON body, here at the OIP path and taking the OIP request body, so the
load generator sends every server the same bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import litserve as ls
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import heavy_model

CLASSES = [str(i) for i in range(heavy_model.N_CLASSES)]
PATH = "/v2/models/wide-cnn/infer"


class HeavyAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.model = heavy_model.build()

    def decode_request(self, request: dict) -> torch.Tensor:
        tensor = request["inputs"][0]
        return torch.tensor(tensor["data"], dtype=torch.float32).view(tensor["shape"])

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(inputs)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return heavy_model.probabilities(self.model, x)

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(output.unsqueeze(1))

    def encode_response(self, output: torch.Tensor) -> dict:
        rows = output.tolist()
        return {
            "model_name": "wide-cnn",
            "outputs": [
                {
                    "name": "label",
                    "shape": [len(rows)],
                    "datatype": "BYTES",
                    "data": [CLASSES[max(range(len(r)), key=r.__getitem__)] for r in rows],
                },
                {
                    "name": "probabilities",
                    "shape": [len(rows), len(CLASSES)],
                    "datatype": "FP32",
                    "data": [p for r in rows for p in r],
                },
            ],
        }


if __name__ == "__main__":
    port, max_batch, timeout = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    api = HeavyAPI(max_batch_size=max_batch, batch_timeout=timeout, api_path=PATH)
    ls.LitServer(api, accelerator="cpu", workers_per_device=1).run(
        port=port, host="127.0.0.1", log_level="error", generate_client_file=False
    )
