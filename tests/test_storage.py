"""The object store against the real local SeaweedFS: verified directory round trips,
corruption detection, checkpoints."""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import pytest

from forgetflow.storage import MANIFEST, CorruptArtifact, S3CheckpointSink

pytestmark = pytest.mark.services


@pytest.fixture
def prefix():
    return f"test-storage/{uuid.uuid4().hex[:8]}"


def _tree(root: Path, big: int = 0) -> dict[str, bytes]:
    files = {"model_card.json": json.dumps({"family": "diffusion"}).encode(),
             "unet/config.json": b'{"sample_size": 16}',
             "unet/diffusion_pytorch_model.safetensors": os.urandom(big or 3000),
             "empty.txt": b""}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_put_dir_get_dir_round_trip_with_a_multipart_file(object_store, prefix, tmp_path):
    files = _tree(tmp_path / "src", big=20 * 1024 * 1024)
    manifest = object_store.put_dir(tmp_path / "src", prefix)
    assert set(manifest["files"]) == set(files)
    for rel, data in files.items():
        assert manifest["files"][rel] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert sorted(object_store.list(prefix)) == sorted([f"{prefix}/{rel}" for rel in files] + [f"{prefix}/{MANIFEST}"])
    big_key = f"{prefix}/unet/diffusion_pytorch_model.safetensors"
    bucket, key = object_store._loc(big_key)
    etag = object_store.client.head_object(Bucket=bucket, Key=key)["ETag"]
    assert "-" in etag, f"expected a multipart upload, got ETag {etag}"

    out = object_store.get_dir(prefix, tmp_path / "dst")
    got = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert got == files
    # the same directory addressed by its s3:// URI
    out2 = object_store.get_dir(object_store.uri(prefix), tmp_path / "dst2")
    assert (out2 / "unet" / "config.json").read_bytes() == files["unet/config.json"]


def test_a_corrupted_object_is_detected_and_named(object_store, prefix, tmp_path):
    _tree(tmp_path / "src")
    object_store.put_dir(tmp_path / "src", prefix)
    object_store.put_bytes(b"tampered weights", f"{prefix}/unet/diffusion_pytorch_model.safetensors")
    with pytest.raises(CorruptArtifact, match="unet/diffusion_pytorch_model.safetensors"):
        object_store.get_dir(prefix, tmp_path / "dst")
    assert not (tmp_path / "dst").exists() or not any((tmp_path / "dst").iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dst.")]  # staging cleaned up

    object_store.put_dir(tmp_path / "src", prefix)  # repaired
    assert (object_store.get_dir(prefix, tmp_path / "ok") / "model_card.json").exists()
    object_store.client.delete_object(Bucket=object_store.bucket, Key=f"{prefix}/unet/config.json")
    with pytest.raises(CorruptArtifact, match="unet/config.json.*missing"):
        object_store.get_dir(prefix, tmp_path / "dst")

    object_store.client.delete_object(Bucket=object_store.bucket, Key=f"{prefix}/{MANIFEST}")
    with pytest.raises(CorruptArtifact, match=f"no {MANIFEST}"):
        object_store.get_dir(prefix, tmp_path / "dst")


def test_objects_list_exists_delete(object_store, prefix, tmp_path):
    assert object_store.list(prefix) == [] and not object_store.exists(f"{prefix}/a")
    object_store.put_bytes(b"a", f"{prefix}/a")
    object_store.put_bytes(b"b", f"{prefix}/sub/b")
    object_store.put_bytes(b"c", f"{prefix}x/c")  # a sibling prefix, not inside
    (tmp_path / "f.bin").write_bytes(b"file")
    assert object_store.put_file(tmp_path / "f.bin", f"{prefix}/f.bin") == f"s3://{object_store.bucket}/{prefix}/f.bin"
    assert object_store.get_file(f"{prefix}/f.bin", tmp_path / "g" / "f.bin").read_bytes() == b"file"
    assert object_store.list(prefix) == [f"{prefix}/a", f"{prefix}/f.bin", f"{prefix}/sub/b"]
    assert object_store.exists(f"{prefix}/a") and object_store.get_bytes(f"{prefix}/sub/b") == b"b"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        object_store.get_bytes(f"{prefix}/nope")
    assert object_store.delete_prefix(prefix) == 3
    assert object_store.list(prefix) == [] and object_store.get_bytes(f"{prefix}x/c") == b"c"
    object_store.delete_prefix(f"{prefix}x")


def test_checkpoint_sink_latest_is_the_highest_step(object_store, tmp_path):
    from forgetflow.checkpoints import CheckpointSink

    request_id = f"req-{uuid.uuid4().hex[:8]}"
    sink = S3CheckpointSink(object_store, "digits-test", request_id)
    assert isinstance(sink, CheckpointSink)
    assert sink.latest() is None
    for step in (5, 120, 40):  # out of order; 120 > 40 > 5 only if steps sort numerically
        state = tmp_path / f"state-{step}"
        state.mkdir()
        (state / "trainer.json").write_text(json.dumps({"step": step}))
        (state / "weights.bin").write_bytes(os.urandom(2048))
        sink.save(step, state)
    # an interrupted upload (no manifest) of a later step is not a checkpoint
    object_store.put_bytes(b"partial", f"digits-test/{request_id}/checkpoints/step-00000200/weights.bin")
    assert object_store.exists(f"digits-test/{request_id}/checkpoints/step-00000120/{MANIFEST}")
    assert sink.steps() == [5, 40, 120]

    step, path = sink.latest()
    assert step == 120
    assert json.loads((path / "trainer.json").read_text()) == {"step": 120}
    assert (path / "weights.bin").read_bytes() == (tmp_path / "state-120" / "weights.bin").read_bytes()

    # a corrupted newest checkpoint is an error, never silently skipped or loaded
    object_store.put_bytes(b"garbage", f"digits-test/{request_id}/checkpoints/step-00000120/weights.bin")
    with pytest.raises(CorruptArtifact, match="step-00000120/weights.bin"):
        sink.latest()

    final = tmp_path / "final"
    final.mkdir()
    (final / "model_card.json").write_text("{}")
    uri = sink.save_final(final)
    assert uri == f"s3://{object_store.bucket}/digits-test/{request_id}/final"
    assert object_store.exists(f"digits-test/{request_id}/final/{MANIFEST}")
    object_store.delete_prefix(f"digits-test/{request_id}")
