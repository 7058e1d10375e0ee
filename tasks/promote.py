"""Stage 6, promote: register the new version with its lineage, always as @challenger; move
@champion only if every gate passed AND the base is still the champion (compare-and-set
under the model's lock), so a crash or a concurrent request never moves it wrongly.
Then the report, the ledger's final state, the shredding of the request key, and the signed
certificate of unlearning that records all of it (forgetflow/certificate.py)."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from prefect import get_run_logger, task

from forgetflow.certificate import (certificate_body, sha256_file, sign, signing_key, tree_hash, weight_hashes,
                                    write_certificate)
from forgetflow.gates import records_passed
from forgetflow.plots import plot_metric_bars
from forgetflow.registry import promote_champion
from forgetflow.report import build_report, code_revisions, pipeline_overhead, write_report
from forgetflow.runs import RunContext, s3_prefix
from tasks.common import StageEnv, retry_if_transient, timed
from forgetflow.bootstrap import EVAL_KIT_TAG

HEADLINE_METRICS = {
    "diffusion": ["unlearning_accuracy", "forget_rate", "paraphrase_forget_rate", "override_fidelity",
                  "remaining_class_accuracy", "retain_accuracy", "style_accuracy", "remaining_fd", "retain_fd",
                  "seconds_per_1000_samples"],  # class and text-to-image models: each plots the keys it has
    "llm": ["leak_rate", "retained_recall", "utility_accuracy", "perplexity", "value_rank"],
}


def _find_registered(env: StageEnv, ctx: RunContext) -> str | None:
    """A version already registered for this run (a retried promote registers once)."""
    for v in env.registry.versions(ctx.model):
        if v.tags.get("forgetflow.request_id") == ctx.request_id and v.tags.get("forgetflow.request_ids", ctx.request_id) == ",".join(ctx.request_ids):
            return v.version
    return None


def _next_eval_kit(env: StageEnv, ctx: RunContext) -> str:
    """The evaluation kit the new version carries: the base's, unless the family derives a
    new one (LLM: the forgotten subjects leave the roster), uploaded by content hash."""
    from forgetflow.bootstrap import upload_eval_kit

    kit = env.family.next_eval_kit(ctx.eval_kit_dir, ctx.synth_dir, ctx.work / "next_eval_kit")
    return ctx.eval_kit_uri if kit is None else upload_eval_kit(ctx.model, kit, env.store)


@task(name="promote", retry_condition_fn=retry_if_transient)
def promote(ctx: RunContext, guidance_scale: float, metrics: dict, gates: list[dict]) -> dict:
    env = StageEnv(ctx)
    with timed(ctx, "promote"):
        passed = records_passed(gates)
        run_info = env.run.client.get_run(ctx.mlflow_run_id)
        uris = {
            "checkpoint": run_info.data.tags.get("forgetflow.checkpoint_uri"),
            "synth": f"s3://{env.settings.bucket}/{s3_prefix(ctx.model, ctx.request_id, 'synth')}",
            "mlflow_run": ctx.mlflow_run_id,
            "eval_kit": ctx.eval_kit_uri,
        }
        eval_kit_uri = _next_eval_kit(env, ctx)
        revisions = code_revisions()
        tags = {
            "forgetflow.request_id": ctx.request_id,
            "forgetflow.request_ids": ",".join(ctx.request_ids),
            "forgetflow.family": ctx.family,
            "forgetflow.method": ctx.method,
            "forgetflow.base_version": ctx.base_version,
            "forgetflow.guidance_scale": str(guidance_scale),
            "forgetflow.gates_passed": str(passed).lower(),
            "forgetflow.gates": json.dumps({g["name"]: [None if g["value"] is None else round(g["value"], 6), g["threshold"],
                                                   g["passed"]] for g in gates}),
            "forgetflow.checkpoint_uri": uris["checkpoint"] or "",
            "forgetflow.git_rev": revisions["git"] or "",
            "forgetflow.dvc_rev": revisions["dvc_lock"] or "",
            EVAL_KIT_TAG: eval_kit_uri,
        }
        version = _find_registered(env, ctx) or env.registry.register(
            ctx.model, ctx.new_dir, run_id=ctx.mlflow_run_id, tags=tags,
            description=f"forgetflow {ctx.method} for request {ctx.request_id}"
                        f"{f' and {len(ctx.batch)} more' if ctx.batch else ''} on v{ctx.base_version}")
        env.registry.set_alias(ctx.model, "challenger", version)
        if passed:
            promote_champion(env.registry, ctx.state_dir, ctx.model, version, ctx.base_version)
            status, error = "promoted", None
        else:
            failed = [g["name"] for g in gates if not g["passed"]]
            status, error = "rejected", "gates failed: " + ", ".join(failed)

    if ctx.started_at:
        ctx.durations_s["total"] = round(time.time() - ctx.started_at, 2)
    figures = [ctx.evaluation_dir / name for name in
               ("samples_before_after.png", "leak_by_attack.png", "guidance_curve.png")]
    figures.append(plot_metric_bars(metrics, HEADLINE_METRICS.get(ctx.family, []), ctx.evaluation_dir / "metric_bars.png"))
    report = build_report(
        request_id=ctx.request_id, request_ids=ctx.request_ids, status=status, model=ctx.model, family=ctx.family, method=ctx.method,
        base_version=ctx.base_version, new_version=version, guidance_scale=guidance_scale, metrics=metrics,
        gates=gates, durations_s=ctx.durations_s, pipeline_overhead=pipeline_overhead(ctx.durations_s), uris=uris,
        revisions=revisions, error=error)
    report_dir = Path(env.params.services.reports_dir) / ctx.request_id
    report_path = write_report(report, report_dir, figures)
    env.run.artifacts(report_dir, "report")
    env.run.tags({"forgetflow.status": status})
    synth_sha256 = tree_hash(weight_hashes(ctx.synth_dir))  # before the clear copy goes
    for request_id in ctx.request_ids:  # one report for the batch; every member reaches its final state
        env.ledger.update(request_id, status, new_version=version, report_path=str(report_path), error=error)
        env.ledger.shred(request_id)
    shutil.rmtree(ctx.synth_dir, ignore_errors=True)  # the only clear copy of the request's data
    _certify(env, ctx, report, report_dir, figures, version, synth_sha256)
    env.run.end(ok=True)
    # the run's working folder goes too: its copies of the versions are in the registry, and
    # its copy of the evaluation kit (an LLM's roster names the forgotten people) is not needed
    shutil.rmtree(ctx.work, ignore_errors=True)
    return report


def _certify(env: StageEnv, ctx: RunContext, report: dict, report_dir: Path, figures: list[Path], version: str,
             synth_sha256: str) -> None:
    """Sign the certificate (after the shredding, which it records), store it beside the
    report, and publish it to MLflow (run artifact + model-version tags). The request is
    already final here, so a tracking server that fails now costs the publication, not the
    request: the certificate stays on disk and the warning says so."""
    body = certificate_body(report=report, ledger=env.ledger, base_dir=ctx.base_dir, new_dir=ctx.new_dir,
                            eval_kit_dir=ctx.eval_kit_dir, eval_kit_uri=ctx.eval_kit_uri, synth_sha256=synth_sha256,
                            card=json.loads((ctx.new_dir / "model_card.json").read_text()))
    cert = sign(body, signing_key(env.params.services, ctx.state_dir))
    cert_path = write_certificate(cert, report_dir)
    write_report(report, report_dir, figures, certificate=cert)  # the page shows the certificate too
    try:
        env.run.artifacts(report_dir, "report")
        env.registry.set_tags(ctx.model, version, {"forgetflow.certificate_sha256": sha256_file(cert_path),
                                                   "forgetflow.certificate_key_id": cert["signature"]["key_id"]})
    except Exception as exc:  # noqa: BLE001 - see the docstring
        get_run_logger().warning("%s: certificate %s not published to MLflow: %s", ctx.run_label, cert_path,
                                 str(exc).splitlines()[0][:200])
