"""The model server's OpenAPI document tells the truth: schemathesis, every check, against
a running server that serves a model, with the control endpoints' token set. A failure of
any check fails the test, not only a 5xx."""

from __future__ import annotations

from tests.mlbus.openapi_support import schemathesis
from tests.serving.conftest import promote, running, save, wait_version

#: An infer body's tensor must fit the model card (its shape, the product of the shape
#: in data): no schema says so, and schema-valid data may earn a 400 there, and only there.
CONTENT_CHECKED = """
[[operations]]
include-path-regex = "/infer$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "404"]

# Feedback names a request id this replica answered, and a label among that version's
# classes: schema-valid data may earn a 404 (an id it did not answer) or a 400 (not a class).
[[operations]]
include-path-regex = "/feedback$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "404"]
"""


def test_the_model_servers_openapi_document_holds_against_the_running_server(
    kafka, store, digits, tmp_path
):
    promote(kafka, "digits", "1", save(store, digits.v1, "models/digits/v1"))
    with running(kafka, store, api_token="s3cret") as srv:
        wait_version(srv, "digits", "1")
        schemathesis(srv.url, tmp_path, token="s3cret", max_examples=10, config=CONTENT_CHECKED)
