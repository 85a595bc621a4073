"""The REST API's OpenAPI schema (``GET /api/v1/schema/``, push.api.schema): served to
anyone, valid OpenAPI 3.0, generated without a warning, and saying what the views do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.contrib.auth.models import User
from django.core.management import call_command
from drf_spectacular.validation import validate_schema
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from accounts.models import ChannelGrant

pytestmark = pytest.mark.django_db

SCHEMA_URL = "/api/v1/schema/"

# Every path of push/api/urls.py but the schema's own, with its methods; the Pusher
# HTTP API (plain Django views, push.api.pusher_urls) is not DRF's and not in it.
REST_PATHS = {
    "/api/v1/channels/": {"get"},
    "/api/v1/channels/{channel}": {"get"},
    "/api/v1/channels/{channel}/messages": {"get", "post"},
    "/api/v1/channels/{channel}/presence": {"get"},
    "/api/v1/messages": {"post"},
    "/api/v1/users/{user_id}/messages": {"post"},
}
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@pytest.fixture
def client() -> APIClient:
    return APIClient()


@pytest.fixture
def schema(client: APIClient) -> dict[str, Any]:
    response = client.get(SCHEMA_URL, {"format": "json"})
    assert response.status_code == 200, response.content
    return json.loads(response.content)


def _resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """``node``, or the component its ``$ref`` names."""
    ref = node.get("$ref")
    if ref is None:
        return node
    assert ref.startswith("#/components/schemas/"), ref
    return doc["components"]["schemas"][ref.rsplit("/", 1)[1]]


def _json_schema(doc: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema of a request body or a response."""
    return _resolve(doc, body["content"]["application/json"]["schema"])


def _parameters(operation: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in operation.get("parameters", []) if p["in"] == where}


def test_schema_is_served_anonymously_as_openapi_3_json(client: APIClient) -> None:
    by_query = client.get(SCHEMA_URL, {"format": "json"})
    assert by_query.status_code == 200
    assert by_query["Content-Type"].startswith("application/vnd.oai.openapi+json")
    by_accept = client.get(SCHEMA_URL, HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert by_accept.status_code == 200
    assert json.loads(by_accept.content) == json.loads(by_query.content)
    assert json.loads(by_query.content)["openapi"].startswith("3.")


def test_schema_is_yaml_by_default(client: APIClient, schema: dict[str, Any]) -> None:
    response = client.get(SCHEMA_URL)
    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/vnd.oai.openapi")
    assert yaml.safe_load(response.content) == schema


def test_schema_is_valid_openapi(schema: dict[str, Any]) -> None:
    validate_schema(schema)  # raises on a document that breaks the OpenAPI 3.0 schema


def test_schema_generates_without_a_warning(tmp_path: Path) -> None:
    """As ``manage.py spectacular`` writes it offline; a view the generator cannot
    read (no serializer, an unknown authenticator) is a warning, failed here."""
    path = tmp_path / "schema.yml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(path))
    assert yaml.safe_load(path.read_text())["paths"].keys() == REST_PATHS.keys()


def test_schema_has_every_rest_path_with_its_methods(schema: dict[str, Any]) -> None:
    methods = {path: set(item) & HTTP_METHODS for path, item in schema["paths"].items()}
    assert methods == REST_PATHS


def test_publish_takes_data_and_an_optional_idempotency_key(schema: dict[str, Any]) -> None:
    for path in ("/api/v1/channels/{channel}/messages", "/api/v1/users/{user_id}/messages"):
        publish = schema["paths"][path]["post"]
        body = _json_schema(schema, publish["requestBody"])
        assert "data" in body["properties"] and body["required"] == ["data"]
        key = _parameters(publish, "header")["Idempotency-Key"]
        assert not key.get("required", False)
        assert key["schema"]["maxLength"] == 255
        for status in ("201", "200"):
            answer = _json_schema(schema, publish["responses"][status])
            assert set(answer["properties"]) == {"channel", "seq", "message_id", "timestamp"}


def test_the_reads_a_subscription_token_opens_name_its_header(schema: dict[str, Any]) -> None:
    paths = schema["paths"]
    for operation in (
        paths["/api/v1/channels/{channel}/messages"]["get"],
        paths["/api/v1/channels/{channel}"]["get"],
    ):
        token = _parameters(operation, "header")["X-Subscription-Token"]
        assert not token.get("required", False)
    publish = paths["/api/v1/channels/{channel}/messages"]["post"]
    assert "X-Subscription-Token" not in _parameters(publish, "header")


def test_history_takes_since_and_limit_and_answers_a_page(schema: dict[str, Any]) -> None:
    history = schema["paths"]["/api/v1/channels/{channel}/messages"]["get"]
    assert {"since", "limit"} <= set(_parameters(history, "query"))
    assert set(_parameters(history, "path")) == {"channel"}
    page = _json_schema(schema, history["responses"]["200"])
    assert page["properties"]["next"]["nullable"] is True
    envelope = _resolve(schema, page["properties"]["results"]["items"])
    assert set(envelope["required"]) == {
        "type",
        "channel",
        "seq",
        "message_id",
        "data",
        "timestamp",
    }


def test_batch_publish_takes_messages_and_answers_results(schema: dict[str, Any]) -> None:
    batch = schema["paths"]["/api/v1/messages"]["post"]
    messages = _json_schema(schema, batch["requestBody"])["properties"]["messages"]
    assert (messages["minItems"], messages["maxItems"]) == (1, 1000)
    assert set(_resolve(schema, messages["items"])["required"]) == {"channel", "data"}
    results = _json_schema(schema, batch["responses"]["201"])["properties"]["results"]
    assert set(_resolve(schema, results["items"])["properties"]) == {
        "channel",
        "seq",
        "message_id",
        "timestamp",
    }


def test_every_error_status_answers_the_error_envelope(schema: dict[str, Any]) -> None:
    seen = set()
    for item in schema["paths"].values():
        for method in set(item) & HTTP_METHODS:
            responses = item[method]["responses"]
            assert {"400", "401", "429", "503"} <= set(responses)
            for status, response in responses.items():
                if int(status) >= 400:
                    seen.add(status)
                    error = _json_schema(schema, response)
                    assert set(error["required"]) == {"type", "code", "message"}
                    assert {"field", "index"} <= set(error["properties"])
    assert seen == {"400", "401", "403", "413", "429", "503"}


def test_writes_need_a_credential_and_reads_may_be_anonymous(schema: dict[str, Any]) -> None:
    assert set(schema["components"]["securitySchemes"]) == {"tokenAuth", "cookieAuth"}
    token = schema["components"]["securitySchemes"]["tokenAuth"]
    assert (token["in"], token["name"]) == ("header", "Authorization")
    for item in schema["paths"].values():
        for method in set(item) & HTTP_METHODS:
            anonymous = {} in item[method]["security"]
            assert anonymous == (method == "get"), (method, item[method]["operationId"])


def _fits(doc: dict[str, Any], component: str, body: dict[str, Any]) -> None:
    """``body`` has every field the component requires and none it does not name."""
    shape = doc["components"]["schemas"][component]
    assert set(shape["required"]) <= set(body) <= set(shape["properties"]), (component, body)


@pytest.mark.django_db(transaction=True)
def test_the_answers_are_the_shapes_the_schema_names(schema: dict[str, Any]) -> None:
    """What the views answer, held against the schema: a view that gains or loses a
    field fails here until the schema says so too."""
    user = User.objects.create_user("schema-publisher", password="x")
    ChannelGrant.objects.create(user=user, pattern="*", can_publish=True, can_presence=True)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    published = api.post("/api/v1/channels/news/messages", {"data": {"a": 1}}, format="json").json()
    _fits(schema, "Published", published)
    batch = api.post(
        "/api/v1/messages", {"messages": [{"channel": "news", "data": 2}]}, format="json"
    ).json()
    _fits(schema, "BatchPublished", batch)
    page = api.get("/api/v1/channels/news/messages").json()
    _fits(schema, "HistoryPage", page)
    _fits(schema, "MessageEnvelope", page["results"][0])
    for channel in ("news", "presence-room"):  # a presence channel's has one field more
        _fits(schema, "Channel", api.get(f"/api/v1/channels/{channel}").json())
    listed = api.get("/api/v1/channels/").json()
    _fits(schema, "ChannelPage", listed)
    _fits(schema, "Channel", listed["results"][0])
    _fits(schema, "Presence", api.get("/api/v1/channels/presence-room/presence").json())
    refused = api.post("/api/v1/channels/bad*name/messages", {"data": 1}, format="json")
    assert refused.status_code == 400
    _fits(schema, "Error", refused.json())


def test_the_schema_is_generated_once_per_format(
    client: APIClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anyone may fetch it: each request must not walk every view again."""
    from drf_spectacular.generators import SchemaGenerator

    from push.api.views import SchemaView

    monkeypatch.setattr(SchemaView, "_rendered", {})
    generated: list[bool] = []
    real = SchemaGenerator.get_schema

    def counting(self: SchemaGenerator, *args: Any, **kwargs: Any) -> Any:
        generated.append(True)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SchemaGenerator, "get_schema", counting)
    bodies = [client.get(SCHEMA_URL, query).content for query in ({}, {"format": "json"}) * 3]
    assert len(generated) == 2
    assert bodies[0] == bodies[2] == bodies[4] and bodies[1] == bodies[3] == bodies[5]
    assert yaml.safe_load(bodies[0]) == json.loads(bodies[1])
    response = client.get(SCHEMA_URL, {"format": "json"})
    assert response["Content-Type"] == "application/vnd.oai.openapi+json"
    assert "filename=" in response["Content-Disposition"]
    # The Accept header's parameters (as a client writes them) are no new key.
    for n in range(5):
        accept = f"application/vnd.oai.openapi+json; indent={n}; x={n}"
        assert client.get(SCHEMA_URL, HTTP_ACCEPT=accept).content == bodies[1]
    assert len(generated) == 2 and len(SchemaView._rendered) == 2
