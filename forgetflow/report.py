"""The report of a request: reports/<request_id>/report.json, report.html and plots.

report.json keys (DESIGN.md "Contracts"): request_id, request_ids (every request the run
applied: the lead alone, or a batch), status (promoted | rejected |
failed), model, family, method, base_version, new_version, guidance_scale, metrics
{"base", "new"}, gates [{name, value, threshold, kind, passed}], durations_s per stage and
"total" (the run, from its model slot to the report), pipeline_overhead (see below), uris (checkpoint, synth data, MLflow run), revisions (git, dvc.lock), error, created.
The HTML page is self-contained (images inlined) and holds no request content: subjects
are named by salted hash only, and a diffusion class label is not personal data.
"""
from __future__ import annotations

import base64
import html
import json
import shutil
import subprocess
import time
from pathlib import Path

REPORT_KEYS = ("request_id", "request_ids", "status", "model", "family", "method", "base_version", "new_version",
               "guidance_scale", "metrics", "gates", "durations_s", "pipeline_overhead", "uris", "revisions", "error",
               "created")
WORK_STAGES = ("unlearn", "calibrate", "evaluate")  # training and evaluation; everything else is the pipeline's


def pipeline_overhead(durations: dict) -> float | None:
    """Share of the run's wall-clock spent outside training and evaluation:
    1 - (unlearn + calibrate + evaluate) / (total - approval), i.e. Prefect, MLflow, S3, DVC,
    intake and promotion; the time a run waited for a person's approval is neither (None
    without a total)."""
    total = (durations.get("total") or 0.0) - durations.get("approval", 0.0)
    if total <= 0:
        return None
    return max(0.0, 1.0 - sum(durations.get(s, 0.0) for s in WORK_STAGES) / total)


def code_revisions(root: Path | None = None) -> dict:
    """The git commit of the code and the hash of dvc.lock (the data revision), if any."""
    root = root or Path.cwd()
    revs = {"git": None, "git_dirty": None, "dvc_lock": None}
    try:
        revs["git"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                     text=True, timeout=10).stdout.strip() or None
        revs["git_dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=root,
                                                capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    lock = root / "dvc.lock"
    if lock.exists():
        import hashlib

        revs["dvc_lock"] = hashlib.sha256(lock.read_bytes()).hexdigest()[:16]
    return revs


def build_report(**fields) -> dict:
    unknown = set(fields) - set(REPORT_KEYS)
    if unknown:
        raise ValueError(f"unknown report fields {sorted(unknown)}")
    report = {key: fields.get(key) for key in REPORT_KEYS}
    report["request_ids"] = report["request_ids"] or [report["request_id"]]
    report["created"] = report["created"] or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return report


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(path.stem.replace("_", " "))}</figcaption></figure>'


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "; ".join(_fmt(v) for v in value) if value else "none"
    return html.escape(str(value))


def render_html(report: dict, figures: list[Path], certificate: dict | None = None) -> str:
    esc = html.escape
    rows = []
    base, new = (report.get("metrics") or {}).get("base", {}), (report.get("metrics") or {}).get("new", {})
    for key in sorted((set(base) | set(new)) - {"attacks"}):
        rows.append(f"<tr><td>{esc(key)}</td><td>{_fmt(base.get(key, ''))}</td><td>{_fmt(new.get(key, ''))}</td></tr>")
    gates = "".join(
        f"<tr class={'pass' if g['passed'] else 'fail'}><td>{esc(g['name'])}</td>"
        f"<td>{'not computed' if g['value'] is None else _fmt(g['value'])}</td>"
        f"<td>{'≥' if g['kind'] == 'min' else '≤'} {_fmt(g['threshold'])}</td><td>{'pass' if g['passed'] else 'FAIL'}"
        f"{'' if not g.get('reason') else ': ' + esc(g['reason'])}</td></tr>"
        for g in report.get("gates") or []
    )
    durations = "".join(f"<tr><td>{esc(k)}</td><td>{v:.1f} s</td></tr>" for k, v in (report.get("durations_s") or {}).items())
    overhead = (f"<p>Pipeline overhead (outside training and evaluation): {report['pipeline_overhead']:.1%}</p>"
                if report.get("pipeline_overhead") is not None else "")
    uris = "".join(f"<tr><td>{esc(k)}</td><td><code>{esc(str(v))}</code></td></tr>" for k, v in {**(report.get("uris") or {}), **(report.get("revisions") or {})}.items())
    ids = report.get("request_ids") or [report["request_id"]]
    batch = f"<p>Applied together in one run: {esc(', '.join(ids))}.</p>" if len(ids) > 1 else ""
    error = f"<p class=fail>Error: {esc(report['error'])}</p>" if report.get("error") else ""
    return f"""<!doctype html><html lang=en><head><meta charset=utf-8>
<title>forgetflow report {esc(report['request_id'])}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
.pass{{color:#176317}}.fail{{color:#a11}}.status{{font-size:1.4em;font-weight:bold}}img{{max-width:100%}}
figure{{margin:1em 0}}</style></head><body>
<h1>Deletion request {esc(report['request_id'])}</h1>
<p class="status {'pass' if report['status'] == 'promoted' else 'fail'}">Status: {esc(report['status'])}</p>
<p>Model <b>{esc(str(report['model']))}</b> ({esc(str(report['family']))}), method <b>{esc(str(report['method']))}</b>:
version {esc(str(report['base_version']))} &rarr; {esc(str(report['new_version']))}; guidance scale {_fmt(report.get('guidance_scale'))}.</p>
{batch}{error}
{_plain_words(report, certificate)}
<h2>Gates</h2><table><tr><th>gate</th><th>value</th><th>threshold</th><th>result</th></tr>{gates}</table>
{_attacks_html(report)}
<h2>Metrics (held-out seeds)</h2><table><tr><th>metric</th><th>base</th><th>new</th></tr>{''.join(rows)}</table>
<h2>Evidence</h2>{''.join(_img(f) for f in figures)}
<h2>Stage durations</h2><table>{durations}</table>{overhead}
<h2>Lineage</h2><table>{uris}</table>
{_certificate_html(certificate)}
<p><small>Created {esc(report['created'])} by forgetflow.</small></p></body></html>"""


def _attack_cell(record: dict | None) -> str:
    """rate (hits/n), the exact 95% upper bound, and what the rate leaves out when partial."""
    if not record:
        return "not run"
    if record.get("rate") is None:
        return f"not measured: {html.escape(record.get('reason') or 'no trials')}"
    extra = "".join(f"<br><small>{html.escape(k.replace('_', ' '))} {_fmt(record[k])}</small>"
                    for k in ("values_leaked", "partial_rate", "per_sample_rate", "mean_rank_percentile", "sample_rate")
                    if record.get(k) is not None)
    return f"{record['rate']:.3g} ({record['hits']}/{record['n']}), upper95 {record['upper95']:.3g}{extra}"


def _attacks_html(report: dict) -> str:
    """One row per attack: the base's and the new version's rate with n and the exact bound;
    red where the new version's bound is above the attack's gate threshold."""
    metrics = report.get("metrics") or {}
    base, new = (metrics.get("base") or {}).get("attacks", {}), (metrics.get("new") or {}).get("attacks", {})
    if not base and not new:
        return ""
    gated = {g["name"].removeprefix("attack:"): g for g in report.get("gates") or [] if g["name"].startswith("attack:")}
    rows = []
    for name in dict.fromkeys([*new, *base]):
        gate = gated.get(name)
        verdict = ("reported, not gated" if gate is None else
                   f"{'pass' if gate['passed'] else 'FAIL'}: upper95 &le; {_fmt(gate['threshold'])}")
        css = "" if gate is None else (" class=pass" if gate["passed"] else " class=fail")
        rows.append(f"<tr{css}><td>{html.escape(name)}</td><td>{_attack_cell(base.get(name))}</td>"
                    f"<td>{_attack_cell(new.get(name))}</td><td>{verdict}</td></tr>")
    return ("<h2>Attacks (held-out material; rate, hits/trials, exact one-sided 95% upper bound)</h2>"
            "<table><tr><th>attack</th><th>base</th><th>new</th><th>gate</th></tr>" + "".join(rows) + "</table>")


def _asked(report: dict, certificate: dict | None) -> str:
    forgotten = (certificate or {}).get("forgotten") or []
    if report.get("family") == "diffusion" and forgotten and "concept" in forgotten[0]:
        drawn = ", ".join(f"{html.escape(f['concept'])} (drawn as \u201c{html.escape(f['override'])}\u201d instead)"
                          for f in forgotten)
        what = "1 concept" if len(forgotten) == 1 else f"{len(forgotten)} concepts"
        return (f"Stop generating {what}, shown here only as salted hashes: {drawn}; over every prompt "
                f"that names it and their paraphrases.")
    if report.get("family") == "diffusion" and forgotten:
        pairs = ", ".join(f"class {p['forget_class']} (drawn as {p['override_class']} instead)" for p in forgotten)
        return f"Stop generating {pairs}."
    if report.get("family") == "llm" and forgotten:
        people = "1 person" if len(forgotten) == 1 else f"{len(forgotten)} people"
        return (f"Stop revealing the personal data of {people} (shown here only as salted "
                f"hashes: {', '.join(html.escape(f['subject']) for f in forgotten)}).")
    return "Forget what the request named (details are in the encrypted request, now destroyed)."


def _plain_words(report: dict, certificate: dict | None) -> str:
    """What was asked and what was done, for a reader who is not an engineer."""
    gates = report.get("gates") or []
    passed = sum(bool(g["passed"]) for g in gates)
    served = {"promoted": "It passed every check and is now the version that is served.",
              "rejected": "It did not pass every check, so it is NOT served; the previous version stays.",
              "failed": "The run failed before it finished; nothing changed in what is served."}.get(report["status"], "")
    done = (f"A new version ({html.escape(str(report.get('new_version')))}) was made from version "
            f"{html.escape(str(report.get('base_version')))} and checked: {passed} of {len(gates)} checks passed. "
            if report.get("new_version") else "")
    return (f"<h2>In plain words</h2><p><b>What was asked:</b> {_asked(report, certificate)}</p>"
            f"<p><b>What was done:</b> {done}{served}</p>")


def _weights_html(facts: dict) -> str:
    return (f"version {html.escape(str(facts['version']))}, {len(facts['files'])} files, "
            f"SHA-256 <code>{html.escape(facts['sha256'][:16])}&hellip;</code>")


def _certificate_html(cert: dict | None) -> str:
    """The certificate in words a compliance officer reads: who signed, which weights, when
    the request key was destroyed, and the one command that checks it all offline."""
    if not cert:
        return ""
    esc = html.escape
    shred = "".join(f"<li>{esc(r['request_id'])}: key destroyed {esc(str(r['at']))}</li>" if r["key_destroyed"]
                    else f"<li class=fail>{esc(r['request_id'])}: key NOT destroyed</li>"
                    for r in cert["key_shredding"]["requests"])
    return f"""<h2>Certificate of unlearning</h2>
<p>Signed with Ed25519 key <code>{esc(cert['signature']['key_id'])}</code> on {esc(cert['timestamps']['certified'])}.
Before: {_weights_html(cert['base'])}. After: {_weights_html(cert['new'])}.</p>
<ul>{shred}</ul>
{_signed_attacks(cert)}
<p>Anyone holding the issuer's public key can check it without a server:
<code>forgetflow certificate verify certificate.json --public-key certificate_key.pem.pub --model-dir DIR</code></p>"""


def _signed_attacks(cert: dict) -> str:
    attacks = cert.get("evaluation", {}).get("attacks") or {}
    if not isinstance(attacks, dict) or not attacks:
        return ""
    listed = "; ".join(f"{html.escape(name)} {r['hits']}/{r['n']} (upper95 {r['upper95']:.3g})" if r.get("rate") is not None
                       else f"{html.escape(name)} not measured" for name, r in attacks.items())
    return f"<p>It signs every attack's result on the new version (hits/trials, exact 95% upper bound): {listed}.</p>"


def write_report(report: dict, out_dir: Path, figures: list[Path] = (), certificate: dict | None = None) -> Path:
    """Write report.json, report.html and copies of the figures; returns report.json as an
    absolute path (the ledger records it for any process, whatever its working folder)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for fig in figures:
        if Path(fig).exists():
            copied.append(Path(shutil.copy2(fig, out_dir / Path(fig).name)))
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out_dir / "report.html").write_text(render_html(report, copied, certificate))
    return (out_dir / "report.json").resolve()
