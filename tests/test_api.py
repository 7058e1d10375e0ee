"""The HTTP intake (forgetflow/api.py) on a real ledger: 202 with the id, 4xx with the reason."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from forgetflow.api import ApiConfigError, create_app
from forgetflow.config import load_params
from forgetflow.ledger import Ledger
from forgetflow.request import MAX_REQUEST_BYTES

TOKEN = "s3cret-token-for-tests"
DOC = {"request_id": "api-1", "model": "digits", "target": {"kind": "diffusion-class", "classes": [7]}}


@pytest.fixture
def client(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGETFLOW_API_TOKEN", TOKEN)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # no server here: accepted, not announced
    return TestClient(create_app(load_params(), str(tmp_path))), tmp_path


def post(client, body, token=TOKEN, content_type="application/json"):
    headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {token}"} if token else {})}
    return client.post("/requests", content=body if isinstance(body, (bytes, str)) else json.dumps(body), headers=headers)


def test_a_valid_request_is_recorded_and_answered_202_with_its_id(client):
    http, state = client
    response = post(http, DOC)
    assert response.status_code == 202, response.text
    assert response.json() == {"request_id": "api-1", "state": "accepted", "created": True, "announced": False}
    assert Ledger(state).get("api-1").state == "accepted"
    again = post(http, "request_id: api-1\nmodel: digits\ntarget: {kind: diffusion-class, classes: [7]}\n",
                 content_type="application/yaml")
    assert again.status_code == 202 and again.json()["created"] is False
    status = http.get("/requests/api-1", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status.status_code == 200 and status.json()["state"] == "accepted" and "target" not in status.json()


@pytest.mark.parametrize("body, code, reason", [
    ({**DOC, "target": {"kind": "diffusion-class", "classes": []}}, 400, "target.diffusion-class.classes"),
    ("request_id: x\nmodel: [unclosed\n", 400, "malformed"),
    ({**DOC, "request_id": "../etc"}, 400, "request_id"),
    (b"x" * (MAX_REQUEST_BYTES + 1), 413, "larger than"),
])
def test_bad_documents_are_refused_with_the_reason_and_leave_no_trace(client, body, code, reason):
    http, state = client
    response = post(http, body)
    assert response.status_code == code and reason in response.json()["detail"], response.text
    assert Ledger(state).list() == []


def test_the_same_id_with_another_document_is_a_conflict(client):
    http, state = client
    assert post(http, DOC).status_code == 202
    response = post(http, {**DOC, "target": {"kind": "diffusion-class", "classes": [3]}})
    assert response.status_code == 409 and "different document" in response.json()["detail"]


@pytest.mark.parametrize("token", [None, "wrong-token-of-some-length"])
def test_without_the_token_nothing_is_accepted(client, token):
    http, state = client
    assert post(http, DOC, token=token).status_code == 401
    assert http.get("/requests/api-1").status_code == 401
    assert Ledger(state).list() == []


def test_the_api_refuses_to_start_without_a_token(tmp_path, monkeypatch):
    monkeypatch.delenv("FORGETFLOW_API_TOKEN", raising=False)
    with pytest.raises(ApiConfigError, match="FORGETFLOW_API_TOKEN"):
        create_app(load_params(), str(tmp_path))
