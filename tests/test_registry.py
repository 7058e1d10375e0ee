"""The MLflow registry against the real local server: versions, aliases, compare-and-set,
download round trip, error messages."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from forgetflow.registry import Registry, UnknownModel

pytestmark = pytest.mark.services


def _model_dir(root: Path, family: str = "diffusion", payload: bytes | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_card.json").write_text(json.dumps({"family": family, "name": "fake-but-real"}))
    (root / "unet").mkdir(exist_ok=True)
    (root / "unet" / "weights.bin").write_bytes(payload if payload is not None else os.urandom(4096))
    return root


@pytest.fixture
def name():
    return f"test-model-{uuid.uuid4().hex[:8]}"


def test_register_twice_aliases_and_compare_and_set(registry, name, tmp_path):
    v1 = registry.register(name, _model_dir(tmp_path / "m1"), run_id=None,
                           tags={"forgetflow.request_id": "", "forgetflow.family": "diffusion"},
                           description="base model")
    v2 = registry.register(name, _model_dir(tmp_path / "m2"), run_id=None,
                           tags={"forgetflow.request_id": "r-1", "forgetflow.base_version": v1},
                           description="forget 7")
    assert (v1, v2) == ("1", "2")
    versions = registry.versions(name)
    assert [v.version for v in versions] == ["1", "2"]
    assert versions[1].tags == {"forgetflow.request_id": "r-1", "forgetflow.base_version": "1"}
    assert versions[1].description == "forget 7" and versions[1].run_id
    assert versions[1].source.startswith("models:/") and versions[1].model_id

    assert registry.champion(name) is None and registry.alias_version(name, "champion") is None
    registry.set_alias(name, "champion", v1)
    registry.set_alias(name, "challenger", v2)
    champion = registry.champion(name)
    assert champion.version == "1" and champion.tags["forgetflow.family"] == "diffusion"
    assert champion.aliases == ("champion",)
    assert registry.alias_version(name, "challenger") == "2"

    # compare-and-set: only moves from the expected champion
    assert registry.move_champion_if(name, v2, expected_current=None) is False
    assert registry.move_champion_if(name, v2, expected_current="2") is False
    assert registry.alias_version(name, "champion") == "1"
    assert registry.move_champion_if(name, v2, expected_current=v1) is True
    assert registry.alias_version(name, "champion") == "2"
    assert registry.move_champion_if(name, v1, expected_current=v1) is False  # stale base: refused
    assert registry.alias_version(name, "champion") == "2"
    assert registry.get_version(name, 2).aliases == ("challenger", "champion")


def test_first_champion_compare_and_set_from_none(registry, name, tmp_path):
    v1 = registry.register(name, _model_dir(tmp_path / "m"), tags={}, description="")
    assert registry.move_champion_if(name, v1, expected_current=None) is True
    assert registry.alias_version(name, "champion") == v1


def test_download_round_trip(registry, name, tmp_path):
    payload = os.urandom(100_000)
    src = _model_dir(tmp_path / "src", payload=payload)
    version = registry.register(name, src, tags={"k": "v"}, description="d")
    dst = tmp_path / "runs" / "r" / "base"
    out = registry.download(name, version, dst)
    assert out == dst
    assert json.loads((dst / "model_card.json").read_text())["name"] == "fake-but-real"
    assert (dst / "unet" / "weights.bin").read_bytes() == payload
    assert sorted(p.name for p in dst.iterdir()) == ["model_card.json", "unet"]
    assert [p.name for p in dst.parent.iterdir()] == ["base"]  # no staging left behind
    registry.download(name, version, dst)  # again, over the same folder
    assert (dst / "unet" / "weights.bin").read_bytes() == payload


def test_register_into_an_existing_run_keeps_it_running(registry, name, tmp_path):
    from forgetflow.tracking import RequestRun

    run = RequestRun.start(registry.tracking_uri, name, "req-1", {"forgetflow.family": "diffusion"})
    version = registry.register(name, _model_dir(tmp_path / "m"), run_id=run.run_id,
                                tags={"forgetflow.request_id": "req-1"}, description="from the request run")
    info = registry.get_version(name, version)
    assert info.run_id == run.run_id
    assert registry.client.get_run(run.run_id).info.status == "RUNNING"
    run.end(ok=True)


def test_unknown_model_and_version_messages(registry, name, tmp_path):
    with pytest.raises(UnknownModel) as err:
        registry.champion(f"{name}-missing")
    assert f"{name}-missing" in str(err.value) and "registered models:" in str(err.value)
    registry.register(name, _model_dir(tmp_path / "m"), tags={}, description="")
    with pytest.raises(UnknownModel, match=rf"registered models: .*{name}"):
        registry.alias_version(f"{name}-missing", "champion")
    with pytest.raises(UnknownModel, match=rf"{name}.*no version 7; versions: 1"):
        registry.get_version(name, 7)
    with pytest.raises(UnknownModel):
        registry.set_alias(name, "champion", 7)
    with pytest.raises(FileNotFoundError, match="model_card.json"):
        registry.register(name, tmp_path / "not-a-model", tags={}, description="")


def test_consumers_load_models_champion_as_pyfunc(registry, name, tmp_path):
    import mlflow

    version = registry.register(name, _model_dir(tmp_path / "m", family="llm"), tags={}, description="")
    registry.set_alias(name, "champion", version)
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    assert model.unwrap_python_model().card["family"] == "llm"
    assert model.unwrap_python_model().lineage == {"registered_model": name}  # how adapters find parents
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model_card.json", "unet"]  # source untouched
    with pytest.raises(Exception, match="prompt"):  # the LLM signature wants a prompt column
        model.predict({"label": [1]})


def test_unreachable_mlflow():
    from forgetflow.services import ServiceUnavailable

    with pytest.raises(ServiceUnavailable, match="MLflow at http://127.0.0.1:9 is not reachable"):
        Registry("http://127.0.0.1:9")


def test_pyfunc_predict_samples_a_registered_diffusion_version(registry, name, tmp_path):
    """The consumer path end to end on a real (untrained, tiny) diffusers UNet: one image per
    row, in row order, deterministic in (rows, seeds)."""
    pytest.importorskip("diffusers")
    import mlflow
    import numpy as np
    import pandas as pd

    from forgetflow.config import load_params
    from forgetflow.diffusion.artifact import DiffusionVersion, ModelCard, new_scheduler, new_unet, save_version

    model = load_params().diffusion.model
    # a one-step generator (1 network evaluation per image): cheap even on a busy CPU
    card = ModelCard(kind="one-step", num_classes=model.num_classes, null_class=model.num_classes,
                     image_size=model.image_size, guidance_scale=1.0, class_names=[str(i) for i in range(10)],
                     t_init=440, sigma_init=2.5)
    save_version(tmp_path / "v", DiffusionVersion(new_unet(model), new_unet(model), new_scheduler(model), card))
    version = registry.register(name, tmp_path / "v", tags={}, description="untrained")
    registry.set_alias(name, "champion", version)

    pyfunc_model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    images = pyfunc_model.predict(pd.DataFrame({"label": [3, 5, 3], "seed": [1, 2, 1]}))
    assert images.shape == (3, 1, model.image_size, model.image_size) and images.dtype == np.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    # deterministic; rows are grouped by seed and put back in input order
    np.testing.assert_array_equal(images, pyfunc_model.predict(pd.DataFrame({"label": [3, 5, 3], "seed": [1, 2, 1]})))
    np.testing.assert_array_equal(images[1], pyfunc_model.predict({"label": [5], "seed": [2]})[0])
    assert not np.array_equal(images[0], images[1])
    # the guidance scale is a declared parameter (the card's 1.0 unless given)
    guided = pyfunc_model.predict(pd.DataFrame({"label": [3, 5, 3], "seed": [1, 2, 1]}), params={"guidance_scale": 3.0})
    assert guided.shape == images.shape and not np.array_equal(guided, images)
    np.testing.assert_array_equal(images, pyfunc_model.predict(pd.DataFrame({"label": [3, 5, 3], "seed": [1, 2, 1]}),
                                                               params={"guidance_scale": 1.0}))


def _race(uri: str, state_dir: str, name: str, version: str, start_at: float, out) -> None:
    """One promotion, in its own process, released at the same instant as its rival."""
    import time

    from forgetflow.registry import PromotionConflict, promote_champion

    time.sleep(max(0.0, start_at - time.time()))
    try:
        promote_champion(Registry(uri, probe=False), state_dir, name, version, "1")
        out.put((version, "won"))
    except PromotionConflict as exc:
        out.put((version, str(exc)))


def test_two_promotions_racing_from_one_base_exactly_one_wins(registry, name, tmp_path, services):
    import multiprocessing
    import time

    v1 = registry.register(name, _model_dir(tmp_path / "m1"))
    registry.set_alias(name, "champion", v1)
    rivals = [registry.register(name, _model_dir(tmp_path / f"m{i}")) for i in (2, 3)]
    ctx = multiprocessing.get_context("spawn")
    out, start_at = ctx.Queue(), time.time() + 8.0  # both processes are up by then
    procs = [ctx.Process(target=_race, args=(services.mlflow_uri, str(tmp_path / "state"), name, v, start_at, out))
             for v in rivals]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    winners = [v for v, r in results.items() if r == "won"]
    assert len(winners) == 1, results
    loser = next(v for v in rivals if v not in winners)
    assert f"base v1 is no longer @champion (now v{winners[0]})" in results[loser]
    assert registry.alias_version(name, "champion") == winners[0]
    # a retried promotion of the winner is not a conflict
    from forgetflow.registry import promote_champion

    promote_champion(registry, str(tmp_path / "state"), name, winners[0], "1")
