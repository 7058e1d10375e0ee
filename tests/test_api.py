"""The HTTP intake (forgetflow/api.py) on a real ledger: 202 with the id, 4xx with the reason."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


DOCUMENTS = st.one_of(
    st.text(max_size=300), st.binary(max_size=300),
    st.fixed_dictionaries({"request_id": st.text(max_size=40), "model": st.text(max_size=20),
                           "target": st.dictionaries(st.sampled_from(["kind", "classes", "subjects", "scope", "x"]),
                                                     st.one_of(st.text(max_size=12), st.lists(st.integers(-3, 12),
                                                                                              max_size=4)),
                                                     max_size=3)},
                          optional={"surprise": st.integers()}).map(json.dumps),
    st.sampled_from(["a: &a [1]\nb: *a\n", "request_id: ../../x\nmodel: m\n", "\ufeff{}", "{" * 500]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=DOCUMENTS, content_type=st.sampled_from(["application/json", "application/yaml", "text/plain"]))
def test_any_body_is_accepted_or_refused_with_a_reason_never_a_crash(client, body, content_type):
    """Whatever arrives: 202 with a ledger entry, or a 4xx whose detail names the problem and
    no new entry; never a 500, never a half-written entry."""
    http, state = client
    before = {e.request_id for e in Ledger(state).list()}
    response = post(http, body, content_type=content_type)
    after = {e.request_id for e in Ledger(state).list()}
    assert response.status_code in (202, 400, 409, 413), response.text
    if response.status_code == 202:
        assert response.json()["request_id"] in after and after - before <= {response.json()["request_id"]}
    else:
        assert after == before and response.json()["detail"].startswith(("invalid request", "cannot read",
                                                                          "request document", "request id"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request_id=st.one_of(st.text(min_size=1, max_size=60), st.sampled_from(["../ledger.db", "..%2Fkeys", "%00"]))
       .filter(lambda s: s.strip(".")))
def test_status_of_any_unknown_id_is_a_404_never_a_crash(client, request_id):
    from urllib.parse import quote

    http, _ = client
    response = http.get(f"/requests/{quote(request_id, safe='')}", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 404, response.text
    assert response.json()["detail"] == "Not Found" or "unknown request id" in response.json()["detail"]
