"""The HTTP intake: a small FastAPI app (`forgetflow api`) for systems that file deletion
requests by themselves (a ticketing system, a privacy portal).

    POST /requests          body: the request document (JSON or YAML, as for `request submit`)
                            202 {"request_id", "state", "created", "announced"}
                            400 malformed or invalid document (the reason names the field)
                            401 missing or wrong bearer token; 409 the id exists with another document
                            413 larger than the request size limit
    GET  /requests/{id}     200 {"request_id", "model", "state", "base_version", "new_version",
                            "flow_run_id", "report_path", "error"}; 404 unknown id
    GET  /healthz           200 {"ok": true} (no token)

Authentication: `Authorization: Bearer <token>`, the token read from the environment variable
named by `orchestration.api_token_env`; the app refuses to start without one. Accepting goes
through the same path as the CLI (ledger first, then the `forgetflow.request.accepted`
event). Responses and logs carry ids and states only, never the document's content.
"""
from __future__ import annotations

import hmac
import os

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from forgetflow.config import Params
from forgetflow.ledger import Ledger, LedgerError, RequestConflict
from forgetflow.request import MAX_REQUEST_BYTES, RequestError, parse_request_text


class ApiConfigError(RuntimeError):
    """The API cannot start as configured (no token)."""


def create_app(params: Params, state_dir: str) -> FastAPI:
    env_name = params.orchestration.api_token_env
    token = os.environ.get(env_name, "")
    if len(token) < 16:
        raise ApiConfigError(f"set {env_name} to a secret of at least 16 characters: the HTTP intake "
                             f"accepts requests only with that bearer token")
    bearer = HTTPBearer(auto_error=False)

    def authorised(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(title="forgetflow intake", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"ok": True}

    @app.post("/requests", status_code=202, dependencies=[Depends(authorised)])
    async def submit(request: Request) -> JSONResponse:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_REQUEST_BYTES:
                raise HTTPException(413, f"request document larger than {MAX_REQUEST_BYTES} bytes")
        try:
            document = parse_request_text(bytes(body))
        except RequestError as exc:
            raise HTTPException(400, str(exc)) from None
        from flows.triggers import submit_request  # the one accept path of CLI and API

        try:
            entry, created, announced = submit_request(document, Ledger(state_dir))
        except LedgerError as exc:
            raise HTTPException(409 if isinstance(exc, RequestConflict) else 503, str(exc)) from None
        return JSONResponse({"request_id": entry.request_id, "state": entry.state, "created": created,
                             "announced": announced}, status_code=202)

    @app.get("/requests/{request_id}", dependencies=[Depends(authorised)])
    def status(request_id: str) -> dict:
        entry = Ledger(state_dir).get(request_id, missing_ok=True)
        if entry is None:
            raise HTTPException(404, f"unknown request id {request_id!r}")
        return {key: getattr(entry, key) for key in ("request_id", "model", "state", "base_version", "new_version",
                                                     "flow_run_id", "report_path", "error")}

    return app
