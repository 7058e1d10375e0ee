"""The ledger keeps every accepted request, is idempotent, and crypto-shreds final ones."""
import pytest

from forgetflow.ledger import Ledger, LedgerError
from forgetflow.request import parse_request

REQ = {"request_id": "r-1", "model": "digits-ddpm", "target": {"kind": "diffusion-class", "classes": [3]}}


def test_submit_is_idempotent_and_conflicts_are_refused(tmp_path):
    ledger = Ledger(tmp_path)
    entry, created = ledger.submit(parse_request(REQ))
    assert created and entry.state == "accepted"
    again, created = ledger.submit(parse_request(REQ))
    assert not created and again.digest == entry.digest
    with pytest.raises(LedgerError, match="different document"):
        ledger.submit(parse_request({**REQ, "reason": "other"}))
    assert [e.request_id for e in ledger.list()] == ["r-1"]


def test_payload_is_encrypted_and_shredded_when_final(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.submit(parse_request({**REQ, "reason": "subject-name-Alice-Zyx"}))
    on_disk = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert b"Alice-Zyx" not in on_disk
    assert ledger.load_request("r-1").reason == "subject-name-Alice-Zyx"
    with pytest.raises(LedgerError, match="not final"):
        ledger.shred("r-1")
    ledger.update("r-1", "promoted", new_version="2")
    ledger.shred("r-1")
    with pytest.raises(LedgerError, match="crypto-shredded"):
        ledger.load_request("r-1")
    entry = ledger.get("r-1")
    assert entry.key_shredded and entry.state == "promoted" and entry.new_version == "2"
    assert [e["state"] for e in ledger.events("r-1")] == ["accepted", "promoted", "key-shredded"]
    ledger.shred("r-1")  # again: one event, the first shredding's time stays
    assert [e["state"] for e in ledger.events("r-1")].count("key-shredded") == 1


def test_unknown_ids_and_fields(tmp_path):
    ledger = Ledger(tmp_path)
    with pytest.raises(LedgerError, match="unknown request id"):
        ledger.get("nope")
    ledger.submit(parse_request(REQ))
    with pytest.raises(LedgerError, match="unknown ledger fields"):
        ledger.update("r-1", "failed", colour="red")
    with pytest.raises(LedgerError, match="unknown state"):
        ledger.update("r-1", "exploded")


def test_unwritable_state_folder_is_a_clear_error(tmp_path):
    (tmp_path / "blocker").write_text("a file where the state folder should be")
    with pytest.raises(LedgerError, match="not writable"):
        Ledger(tmp_path / "blocker" / "state")


def test_sealed_request_data_is_unreadable_after_shredding(tmp_path):
    from cryptography.fernet import Fernet, InvalidToken

    from forgetflow.request import parse_request
    from forgetflow.sealing import open_dir, seal_dir

    ledger = Ledger(tmp_path / "state")
    request = parse_request({"request_id": "r-seal", "model": "m", "target": {
        "kind": "llm-subjects", "subjects": [{"name": "Ada Byron"}]}})
    ledger.submit(request)
    clear = tmp_path / "synth"
    (clear / "sub").mkdir(parents=True)
    (clear / "sub" / "rows.jsonl").write_text('{"user": "What is the phone number of Ada Byron?"}')
    sealed = seal_dir(clear, tmp_path / "sealed", ledger.request_key("r-seal"))
    blob = (sealed / "sub" / "rows.jsonl.fernet").read_bytes()
    assert b"Ada" not in blob
    back = open_dir(sealed, tmp_path / "back", ledger.request_key("r-seal"))
    assert (back / "sub" / "rows.jsonl").read_text() == (clear / "sub" / "rows.jsonl").read_text()
    ledger.update("r-seal", "rejected")
    ledger.shred("r-seal")
    with pytest.raises(LedgerError, match="crypto-shredded"):
        ledger.request_key("r-seal")
    with pytest.raises(InvalidToken):  # no other key opens it
        open_dir(sealed, tmp_path / "again", Fernet.generate_key())
