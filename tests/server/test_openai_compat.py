"""What an OpenAI client meets first, on the tiny model in process: models.retrieve. The official
`openai` client runs over the TestClient."""

from __future__ import annotations

import openai
import pytest

from tests.server.conftest import tiny_client
from tests.server.test_http_errors import assert_error

MAX_MODEL_LEN = 256  # tiny_client's default


@pytest.fixture(scope="module")
def client(tiny_server_model):
    with tiny_client(tiny_server_model, served_model_name="org/tiny") as c:
        yield c


@pytest.fixture(scope="module")
def oai(client):
    return openai.OpenAI(base_url=str(client.base_url) + "/v1", api_key="unused", http_client=client,
                         max_retries=0)


def test_models_retrieve_returns_the_listed_model(oai):
    listed = oai.models.list().data
    assert [m.id for m in listed] == ["org/tiny"]  # a slash in the name survives the client's %2F
    got = oai.models.retrieve("org/tiny")
    assert got.model_dump() == listed[0].model_dump()
    assert got.object == "model" and got.max_model_len == MAX_MODEL_LEN


def test_models_retrieve_unknown_is_openai_404_naming_it(oai, client):
    with pytest.raises(openai.NotFoundError) as info:
        oai.models.retrieve("gpt-9")
    assert "gpt-9" in str(info.value)
    err = assert_error(client.get("/v1/models/gpt-9"), 404, param="model", contains="`gpt-9`")
    assert err["code"] == "model_not_found" and "org/tiny" in err["message"]
    assert_error(client.get("/v1/models/org"), 404, param="model")  # a prefix of the name is not it
