"""Property-based fuzzing (Schemathesis) of every operation in the app's own OpenAPI schema:
whatever a client sends, the answer is never a 5xx, and every 4xx has the OpenAI error shape.

Operations are walked by hand (each one's Hypothesis strategy under `given`) rather than through
Schemathesis' pytest plugin, which does not load under every pytest version we run on."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.server.conftest import tiny_client

EXAMPLES_PER_OPERATION = 40


@pytest.fixture(scope="module")
def api_schema(tiny_server_model):
    # A short context keeps every valid request cheap on the tiny model.
    with tiny_client(tiny_server_model, max_model_len=48) as client:
        yield schemathesis.openapi.from_asgi("/openapi.json", client.app)


def test_no_server_errors(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    labels = {f"{op.method.upper()} {op.path}" for op in operations}
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize", "POST /detokenize",
            "GET /v1/models", "GET /health", "GET /metrics"} <= labels
    statuses: dict[str, set[int]] = {}
    for op in operations:
        label = f"{op.method.upper()} {op.path}"

        @given(case=op.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call()
            statuses.setdefault(label, set()).add(response.status_code)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text)
            if response.status_code >= 400:
                error = response.json()["error"]
                assert error["message"] and set(error) == {"message", "type", "param", "code"}

        check()
    # The fuzzer reached the engine, not only the validators.
    assert 200 in statuses["POST /v1/completions"] and 200 in statuses["POST /v1/chat/completions"], statuses
    print(statuses)
