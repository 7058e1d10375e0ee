"""`forgetflow bench` as a user runs it, in a small configuration (the benchmark's numbers are
its output, not asserted here): every method of the family side by side, statistics over
seeds, the table, the JSON file, the plots, and the MLflow parent and child runs on the
session's real server."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from forgetflow.bench_folder import TRIALS
from tests.cli import forgetflow
from tests.llm_fixtures import llm_params, support_llm  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.services]
PROJECT = Path(__file__).resolve().parent.parent
SMALL = {  # the tiny preset, smaller again: the bench's plumbing is under test
    "diffusion": {"base": {"steps": 30, "judge_epochs": 1}, "sampler": {"num_inference_steps": 2},
                  "sfd": {"iterations": 6, "sid_iterations": 2, "checkpoint_every": 100, "log_every": 2},
                  "esd": {"iterations": 6, "batch_size": 8},
                  "calibrate": {"guidance_scales": [1.0], "samples_per_class": 4},
                  "evaluate": {"forget_samples": 8, "samples_per_remaining_class": 4}},
    "llm": {"unlearn": {"epochs": 1}, "calibrate": {"guidance_scales": [1.0, 2.0]}},
}


def small_params(directory: Path) -> Path:
    data = yaml.safe_load((PROJECT / "params.yaml").read_text())
    for family, sections in SMALL.items():
        for section, fields in sections.items():
            data["presets"]["tiny"][family].setdefault(section, {}).update(fields)
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def bench(workdir: Path, state_dir: Path, *args: str) -> dict:
    out = forgetflow(workdir, state_dir, "--params", str(small_params(workdir)), "bench", "--out",
                     str(workdir / "results"), *args)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (folder,) = (workdir / "results").iterdir()
    assert str(folder) in out.stdout.replace("\n", "")
    result = json.loads((folder / "results.json").read_text())
    command = " ".join(["forgetflow", "--preset", "tiny", "--params", str(small_params(workdir)), "bench", "--out", str(workdir / "results"), *args])
    assert result["command"] == command and f"made by `{command}`" in (folder / "results.md").read_text()
    assert (folder / "tradeoff.png").stat().st_size > 5000 and (folder / "seconds.png").stat().st_size > 5000
    # the gamma plot: every calibrated trial keeps its sweep, each row gated
    curves = [t["curve"] for t in result["trials"] if t["curve"]]
    assert curves and all(isinstance(row["passed"], bool) for c in curves for row in c)
    assert (folder / "gamma.png").stat().st_size > 5000
    return {"result": result, "table": (folder / "results.md").read_text(), "stdout": out.stdout}


def mlflow_children(services, result: dict) -> list:
    client = MlflowClient(services.mlflow_uri)
    exp = client.get_experiment_by_name("forgetflow/bench")
    parents = client.search_runs([exp.experiment_id],
                                 f"attributes.run_name = 'bench-{result['family']}-{result['created']}'")
    assert len(parents) == 1
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id)} >= {"results.json", "results.md", "gamma.png"}
    return client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")


def test_diffusion_methods_esd_and_retrain_side_by_side_over_two_seeds(services, tmp_path):
    run = bench(tmp_path, Path(services.state_dir), "--family", "diffusion", "--seeds", "2")
    result, table = run["result"], run["table"]
    assert result["methods"] == ["sfd", "sfd-two-stage", "sid", "esd", "retrain"]
    assert len(result["trials"]) == 10 and {t["seed"] for t in result["trials"]} == {0, 1}
    for method, row in result["summary"].items():
        assert row["seeds"] == 2 and row["unlearn_s"]["mean"] > 0 and row["peak_memory_mb"]["mean"] > 100
        assert row["request_s"]["mean"] > row["unlearn_s"]["mean"]  # + calibrate and evaluate
        ua = row["unlearning_accuracy"]
        assert 0 <= ua["ci95"][0] <= ua["mean"] <= ua["ci95"][1] <= 1 and ua["sd"] >= 0
        assert f"| {method}" in table
    untargeted = {t["method"]: t["metrics"]["random_override"] for t in result["trials"]}
    assert untargeted == {"sfd": False, "sfd-two-stage": False, "sid": False, "esd": True, "retrain": True}
    assert result["summary"]["sfd"]["nfe"]["mean"] == 1 and result["summary"]["retrain"]["nfe"]["mean"] > 1
    assert set(result["dominated_by"]) <= set(result["methods"])  # the front, stored with the results
    assert "retrain (real data:" in table and "esd (real data:" in table  # which peers need the real data
    children = mlflow_children(services, result)
    assert sorted(r.data.tags["forgetflow.method"] for r in children) == sorted([*result["methods"]] * 2)
    assert all("unlearning_accuracy" in r.data.metrics and "unlearn_s" in r.data.metrics for r in children)


def test_llm_bench_on_your_own_model_killed_and_resumed(services, support_llm, tmp_path):
    """A user's own base version and kit (here the session's tiny support model), two peers. The
    run is killed (SIGKILL) once its first trial is kept; `--resume` finishes it without running
    that trial again, and the results name both commands."""
    state_dir, results = Path(services.state_dir), tmp_path / "results"
    args = ["--preset", "tiny", "--params", str(small_params(tmp_path)), "bench", "--out", str(results),
            "--family", "llm", "--seeds", "1", "--methods", "grad-ascent,control-phrase",
            "--model-dir", str(support_llm / "model"), "--eval-kit", str(support_llm / "eval_kit")]
    log = tmp_path / "killed.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "forgetflow.cli", *args], cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "FORGETFLOW_STATE_DIR": str(state_dir)})
    deadline = time.time() + 900
    while not any(len(p.read_text().splitlines()) >= 1 for p in results.glob(f"*/{TRIALS}")):
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    (folder,) = results.iterdir()
    assert f"forgetflow bench --resume {folder}" in log.read_text().replace("\n", "")  # said at the start
    assert not (folder / "results.json").exists()
    kept = (folder / TRIALS).read_text()
    first = json.loads(kept.splitlines()[0])
    assert first["method"] == "grad-ascent"
    stamp = (folder / "work" / "grad-ascent-seed0").stat().st_mtime_ns

    resumed = forgetflow(tmp_path, state_dir, "bench", "--resume", str(folder))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    result = json.loads((folder / "results.json").read_text())
    assert result["command"] == shlex.join(["forgetflow", *args])
    assert result["resumed_by"] == shlex.join(["forgetflow", "--preset", "tiny", "bench", "--resume", str(folder)])
    assert "finished by `forgetflow --preset tiny bench --resume" in (folder / "results.md").read_text()
    assert [t["method"] for t in result["trials"]] == ["grad-ascent", "control-phrase"]
    assert result["trials"][0] == first and (folder / TRIALS).read_text().startswith(kept)  # kept, not rerun
    assert (folder / "work" / "grad-ascent-seed0").stat().st_mtime_ns == stamp
    trial = result["trials"][0]
    assert {g["name"] for g in trial["gates"]} >= {"leak_rate", "retained_recall_drop"}
    row = result["summary"]["grad-ascent"]
    assert row["leak_rate"]["ci95"] and row["tokens_per_s_guided"]["mean"] > 0 and row["tokens_per_s_unguided"]["mean"] > 0
    assert trial["items"]["leak_rate"] >= 4  # four customers' values
    # membership inference: the base singles the four out from never-seen people
    assert trial["metrics"]["base"]["mia_auc"] > 0.7 and 0.0 <= trial["metrics"]["mia_auc"] <= 1.0
    assert len(mlflow_children(services, result)) == 2
    # the plan is the folder's: a resume that asks for other seeds, or another family, is refused
    refused = forgetflow(tmp_path, state_dir, "bench", "--resume", str(folder), "--seeds", "3", "--no-mlflow")
    assert refused.returncode == 1 and "drop --seeds" in refused.stderr
    assert forgetflow(tmp_path, state_dir, "bench", "--rerun", "grad-ascent").returncode == 1  # needs --resume

    # a fix to one method: --rerun runs its trials again and keeps the others' as they were
    rerun = forgetflow(tmp_path, state_dir, "bench", "--resume", str(folder), "--rerun", "control-phrase", "--no-mlflow")
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    again = json.loads((folder / "results.json").read_text())
    assert again["trials"][0] == first and (folder / "work" / "grad-ascent-seed0").stat().st_mtime_ns == stamp
    assert [(t["method"], t["seed"]) for t in again["superseded"]] == [("control-phrase", 0)]
    assert again["trials"][1]["code"] and "rerun: 1 earlier trial(s) of control-phrase" in (folder / "results.md").read_text()
