"""End to end: `tritonclient.http`, the most used Open Inference Protocol client, in its
default mode (binary tensors in and out, gzip-compressed requests when asked), against
`mlbus serve` as its own process serving the champion it found in the log; its answers are
the JSON protocol's."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import httpx
import numpy as np
import tritonclient.http as triton

from mlbus.storage import ObjectStore
from tests.mlbus.kafka.support import wait_until
from tests.mlbus.test_cli import MLBUS, env  # noqa: F401 - env is a fixture
from tests.serving.conftest import body, digits, free_port, promote, save  # noqa: F401 - digits is a fixture
from tests.serving.test_cli import FAST


def test_tritonclient_in_its_default_mode_infers_against_mlbus_serve(env, kafka, digits):  # noqa: F811
    store = ObjectStore((Path(env["MLBUS_DATA_DIR"]) / "objects").resolve().as_uri())
    promote(kafka, "digits", "1", save(store, digits.v1, "models/digits/v1"))
    port = free_port()
    process = subprocess.Popen(
        [MLBUS, "serve", "--port", str(port)],
        env=env | FAST,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/v2/models/digits/ready").status_code == 200
            except httpx.HTTPError:
                return process.poll() is not None  # died: fail below with its output

        wait_until(ready, "mlbus serve serving digits", timeout=90)
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        rows = digits.x[:5].astype(np.float32)
        plain = httpx.post(f"{url}/v2/models/digits/infer", json=body(rows)).json()
        label, probabilities = plain["outputs"]

        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            assert client.is_server_ready() and client.is_model_ready("digits")
            tensor = triton.InferInput("input", list(rows.shape), "FP32")
            tensor.set_data_from_numpy(rows)  # binary_data=True: the client's default
            for compression in (None, "gzip"):
                result = client.infer("digits", [tensor], request_compression_algorithm=compression)
                response = result.get_response()
                assert response["model_version"] == "1"
                assert all(o["parameters"]["binary_data_size"] > 0 for o in response["outputs"])
                assert [x.decode() for x in result.as_numpy("label")] == label["data"]
                np.testing.assert_array_equal(
                    result.as_numpy("probabilities"),
                    np.asarray(probabilities["data"], dtype=np.float32).reshape(5, 10),
                )
        finally:
            client.close()
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0]
        assert process.returncode == 0, output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
