"""Hostile HTTP input, zero server errors: Schemathesis over every operation of the web app.

The sample's FastAPI app (``config.web``: the engine's ``/sagas`` routes, the dashboard's JSON
API, the order domain's routes) runs in this process through its ASGI interface, against a real
migrated database (a SQLite file and PostgreSQL, the ``backend`` fixture, whose worker runs the
sagas the generated orders start). Schemathesis generates requests from the app's own OpenAPI
schema, valid and invalid (NUL characters, huge integers, wrong types), with no token, the admin
token and a wrong one; every answer must be below 500. A stateful run follows the schema's links
from ``POST /orders`` to the order, its saga, and the saga's retry and cancel.

The trip example's web handler (``examples/trip/tripapp/web.py``, ``http.server``) has no
OpenAPI schema: ``tests/examples/test_trip_hostile.py`` sends it hypothesis-generated requests.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, settings
from schemathesis import GenerationMode

from config.settings import Settings
from config.web import create_app
from sagas.ops.bounds import MAX_OFFSET, MAX_VERSION
from tests.conftest import Backend

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

TOKEN = "hostile-admin-token"
EXAMPLES = int(os.environ.get("HOSTILE_HTTP_EXAMPLES", "50"))
OVERFLOW = 9223372036854775808  # 2**63: an OverflowError on SQLite, out of range on PostgreSQL

# The app reads its database per request: the ``engine_backend`` fixture points it at one.
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(Settings(admin_token=TOKEN)))
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=EXAMPLES,
)
HYPOTHESIS = settings(
    deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


def _auth(token: str | None) -> dict[str, str] | None:
    return {"Authorization": f"Bearer {token}"} if token else None


def _no_server_error(case: Any, response: Any) -> None:
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path} -> {response.status_code}: "
        f"{response.text[:300]}\n{case.as_curl_command()}"
    )


@schema.parametrize()
@HYPOTHESIS
def test_no_generated_request_gets_a_server_error(engine_backend: Backend, case: Any) -> None:
    _no_server_error(case, case.call(headers=_auth(TOKEN)))


@schema.include(method="POST").parametrize()
@pytest.mark.parametrize("token", [None, "wrong-token"], ids=["anonymous", "wrong"])
@HYPOTHESIS
def test_no_generated_post_without_the_admin_token_gets_a_server_error(
    engine_backend: Backend, case: Any, token: str | None
) -> None:
    _no_server_error(case, case.call(headers=_auth(token)))


class Workflow(schema.as_state_machine()):  # type: ignore[misc]
    """POST /orders, then what its links lead to, with any of the three tokens."""

    token: str | None = TOKEN

    def get_call_kwargs(self, case: Any) -> dict[str, Any]:
        return {"headers": _auth(self.token)} if self.token else {}

    def validate_response(self, response: Any, case: Any, *args: Any, **kwargs: Any) -> None:
        _no_server_error(case, response)


@pytest.mark.parametrize("token", [TOKEN, None, "wrong-token"])
def test_stateful_order_workflows_get_no_server_error(engine_backend: Backend, token: str | None):
    Workflow.token = token
    Workflow.run(settings=settings(
        HYPOTHESIS, max_examples=max(EXAMPLES // 5, 5), stateful_step_count=6,
    ))


# --- the bounds, named -------------------------------------------------------------------------
@pytest.fixture
def client(engine_backend: Backend) -> Any:
    with TestClient(create_app(Settings(admin_token=TOKEN)), raise_server_exceptions=False) as c:
        yield c


INTEGER_PARAMETERS = [
    ("/sagas", "offset", MAX_OFFSET),
    ("/sagas", "version", MAX_VERSION),
    ("/orders", "offset", MAX_OFFSET),
    ("/inventory", "offset", MAX_OFFSET),
    ("/payments", "offset", MAX_OFFSET),
    ("/shipments", "offset", MAX_OFFSET),
    ("/dashboard/api/sagas", "offset", MAX_OFFSET),
    ("/dashboard/api/sagas", "version", MAX_VERSION),
]


@pytest.mark.parametrize(("path", "parameter", "bound"), INTEGER_PARAMETERS)
def test_an_integer_past_its_bound_is_a_422_naming_the_parameter(
    client: TestClient, path: str, parameter: str, bound: int
):
    for value in (OVERFLOW, bound + 1, 10**40):
        response = client.get(path, params={parameter: value})
        assert response.status_code == 422, (value, response.text)
        [error] = response.json()["detail"]
        assert (error["loc"], error["field"]) == (["query", parameter], parameter)
    assert client.get(path, params={parameter: bound}).status_code == 200


@pytest.mark.parametrize(("method", "url", "where"), [
    ("GET", "/sagas?name=a%00b", ["query", "name"]),
    ("GET", "/orders?customer_id=%00", ["query", "customer_id"]),
    ("GET", "/inventory?saga_id=x%00", ["query", "saga_id"]),
    ("GET", "/dashboard/api/sagas?q=%00", ["query", "q"]),
    ("GET", "/sagas/a%00b", ["path", "path"]),
    ("GET", "/orders/a%00b", ["path", "path"]),
    ("GET", "/dashboard/sagas/a%00b", ["path", "path"]),
    ("POST", "/sagas/a%00b/retry", ["path", "path"]),
    ("POST", "/sagas/a%00b/cancel", ["path", "path"]),
])
def test_a_nul_character_is_a_422_naming_where_it_was(
    client: TestClient, method: str, url: str, where: list[str]
):
    """PostgreSQL text cannot hold NUL: the driver would raise before the query is sent."""
    response = client.request(method, url, headers=_auth(TOKEN))
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == where


def test_an_order_with_a_nul_in_a_field_or_its_key_is_a_422_naming_it(client: TestClient):
    order = {"customer_id": "c\u0000", "item": "book", "quantity": 1, "price": 10}
    response = client.post("/orders", json=order)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "customer_id"]
    response = client.post("/orders", json={**order, "customer_id": "c1"},
                           headers={"Idempotency-Key": "k\u0000"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["header", "idempotency-key"]
