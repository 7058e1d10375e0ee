"""`forgetflow certificate ...`: check a certificate of unlearning offline, re-check that
today's champion still honours it, and hand out the issuer's public key."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import typer
from rich.table import Table

from forgetflow.certificate import (CERTIFICATE_FILE, CertificateError, key_file_path, public_key_path, public_pem,
                                    read_certificate, read_public_key, signing_key, verify)
from forgetflow.config import load_params

certificate_app = typer.Typer(help="Certificates of unlearning: verify offline, re-verify on the champion.",
                              no_args_is_help=True)


def attack_table(attacks: dict[str, dict], title: str) -> Table:
    """One row per attack record (forgetflow/stats.py): rate, hits/trials, exact bounds."""
    table = Table(title=title)
    for col in ("attack", "rate", "hits/trials", "upper95", "95% interval"):
        table.add_column(col)
    for name, r in attacks.items():
        if r.get("rate") is None:
            table.add_row(name, "not measured", f"0/{r.get('n', 0)}", "", r.get("reason") or "")
            continue
        lo, hi = r["interval95"]
        table.add_row(name, f"{r['rate']:.3g}", f"{r['hits']}/{r['n']}", f"{r['upper95']:.3g}", f"[{lo:.3g}, {hi:.3g}]")
    return table


def _cli():
    from forgetflow import cli

    return cli


@certificate_app.command("verify")
def verify_cmd(file: Path,
               public_key: Path = typer.Option(None, "--public-key", help="The issuer's public key (PEM). "
                                               "Without it only integrity is checked, not who signed."),
               model_dir: Path = typer.Option(None, "--model-dir", help="The certified new version's files: "
                                              "their SHA-256 must match.")):
    """Check a certificate's signature, every field, and (given the model files) the weights.
    Needs no server and no network."""
    cli = _cli()
    try:
        cert = read_certificate(file)
        key = read_public_key(public_key) if public_key else None
        checked = verify(cert, key, model_dir)
    except CertificateError as exc:
        cli._fail(f"certificate {file} does not verify: {exc}")
    for line in checked:
        cli.console.print(f"[green]ok[/] {line}")
    cli.console.print(f"[bold green]valid[/]: request {cert['request_id']} ({cert['status']}), {cert['model']} "
                      f"v{cert['base']['version']} -> v{cert['new']['version']}, key destroyed: "
                      f"{all(r['key_destroyed'] for r in cert['key_shredding']['requests'])}")


@certificate_app.command("public-key")
def public_key_cmd(ctx: typer.Context):
    """Print the issuer's public key (PEM): what a verifier needs (made on first use)."""
    o = ctx.obj
    key = signing_key(load_params(o.params_path, preset=o.preset).services, Path(o.state_dir))
    typer.echo(public_pem(key.public_key()).decode(), nl=False)


@certificate_app.command("reverify")
def reverify_cmd(ctx: typer.Context, request_id: str,
                 subjects: Path = typer.Option(None, "--subjects", help="LLM: the request document again (the "
                                               "certificate holds subjects by salted hash only).")):
    """Re-run the certificate's forgetting checks on the model's CURRENT champion and say
    whether it still honours the request; writes reverify-<time>.json beside the certificate."""
    from forgetflow.bootstrap import EVAL_KIT_TAG
    from forgetflow.families import get_family
    from forgetflow.ledger import Ledger
    from forgetflow.registry import Registry
    from forgetflow.request import load_request
    from forgetflow.storage import ObjectStore

    cli, o = _cli(), ctx.obj
    params, settings = cli._guard(cli._connect, o)
    entry = cli._guard(lambda: Ledger(o.state_dir).get(request_id))
    if not entry.report_path:
        cli._fail(f"request {request_id} is {entry.state}: it has no certificate yet")
    cert_path = Path(entry.report_path).parent / CERTIFICATE_FILE
    try:
        cert = read_certificate(cert_path)
        issuer = public_key_path(key_file_path(params.services, o.state_dir))
        verify(cert, read_public_key(issuer) if issuer.exists() else None)
    except CertificateError as exc:
        cli._fail(f"certificate {cert_path} does not verify: {exc}")
    names = None
    if subjects is not None:
        doc = cli._guard(load_request, subjects)
        names = [{"name": s.name, "values": dict(s.values)} for s in getattr(doc.target, "subjects", [])]
    registry = cli._guard(Registry, settings.mlflow_uri)
    champion = cli._guard(registry.champion, cert["model"])
    if champion is None:
        cli._fail(f"model {cert['model']} has no @champion to re-verify")
    family = get_family(cert["family"])
    with tempfile.TemporaryDirectory(prefix="forgetflow-reverify-") as tmp:
        model_dir = registry.download(cert["model"], champion.version, Path(tmp) / "champion")
        base_dir = registry.download(cert["model"], cert["base"]["version"], Path(tmp) / "base")
        kit = ObjectStore(settings).get_dir(champion.tags[EVAL_KIT_TAG], Path(tmp) / "eval_kit")
        gates, attacks = cli._guard(family.reverify, model_dir, Path(kit), cert, params, base_dir=base_dir,
                                    subjects=names)
    table = Table(title=f"request {request_id} on {cert['model']} v{champion.version} (certified on v{cert['new']['version']})")
    for col in ("check", "now", "threshold", "result"):
        table.add_column(col)
    for g in gates:
        table.add_row(g.name, "not computed" if g.value is None else f"{g.value:.4g}",
                      f"{'>=' if g.kind == 'min' else '<='} {g.threshold:g}",
                      "[green]pass[/]" if g.passed else f"[red]FAIL[/]{': ' + g.reason if g.reason else ''}")
    cli.console.print(table)
    cli.console.print(attack_table(attacks, title="attacks now (rate, hits/trials, exact 95% upper bound)"))
    honoured = bool(gates) and all(g.passed for g in gates)
    out = cert_path.parent / f"reverify-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.write_text(json.dumps({"request_id": request_id, "model": cert["model"], "version": champion.version,
                               "honoured": honoured, "gates": [g.to_dict() for g in gates], "attacks": attacks},
                              indent=1))
    cli.console.print(f"{'[bold green]honoured' if honoured else '[bold red]NOT honoured'}[/] by "
                      f"v{champion.version}; written {out}")
    if not honoured:
        raise typer.Exit(1)

