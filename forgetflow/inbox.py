"""The inbox: request documents dropped in s3://<bucket>/<inbox_prefix>/, the way a ticketing
system or another team hands a request over without the CLI or the HTTP endpoint.

:func:`collect_inbox` validates each document exactly like `forgetflow request submit`,
records it in the ledger and then deletes it from the inbox: the document is personal data
and the ledger now holds it encrypted under the request's key. A refused document is moved,
not deleted, to <inbox_prefix>-refused/<name> beside <name>.reason.txt, which names the
problem, so nothing is lost and whoever dropped it can see why.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from forgetflow.ledger import Ledger, LedgerError
from forgetflow.request import RequestError, parse_request_text
from forgetflow.storage import ObjectStore


@dataclass
class InboxSweep:
    accepted: list[str] = field(default_factory=list)  # request ids now in the ledger (new or already known)
    refused: dict[str, str] = field(default_factory=dict)  # inbox key -> reason


def collect_inbox(store: ObjectStore, ledger: Ledger, prefix: str) -> InboxSweep:
    sweep = InboxSweep()
    for key in store.list(prefix):
        data = store.get_bytes(key)
        try:
            entry, _ = ledger.submit(parse_request_text(data))
        except (RequestError, LedgerError) as exc:
            refused = f"{prefix}-refused/{key[len(prefix) + 1:]}"
            store.put_bytes(data, refused)
            store.put_bytes(f"{exc}\n".encode(), f"{refused}.reason.txt")
            sweep.refused[key] = str(exc)
        else:
            sweep.accepted.append(entry.request_id)
        store.delete(key)
    return sweep
