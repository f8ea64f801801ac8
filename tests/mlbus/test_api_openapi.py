"""The control plane's OpenAPI document tells the truth: schemathesis, every check, against
the real API on the session broker, with the token set (so that the document's security
is checked both ways). A failure of any check fails the test, not only a 5xx."""

from __future__ import annotations

from mlbus.cli.control_plane import create_app
from tests.mlbus.openapi_support import schemathesis, served
from tests.mlbus.test_api import announce_dataset, settings_for

#: Two bodies no schema can judge: a dataset's URI must name a readable file in the store,
#: and a pipeline's text must be a pipeline (names the line). Schema-valid data may earn a
#: 400 there, and only there.
CONTENT_CHECKED = """
[[operations]]
include-path = "/datasets"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "404"]

[[operations]]
include-path = "/pipelines"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "404"]
"""


def test_the_control_planes_openapi_document_holds_against_the_running_api(kafka, tmp_path):
    announce_dataset(kafka)
    cfg = settings_for(kafka, tmp_path, api_token="s3cret")
    with served(create_app(cfg)) as url:
        schemathesis(url, tmp_path, token="s3cret", max_examples=10, config=CONTENT_CHECKED)
