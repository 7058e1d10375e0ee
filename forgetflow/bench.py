"""`forgetflow bench`: every method of a family on one base model and one request, in one process.

Each method and seed runs the request through the family's own stages (synthesize -> unlearn
-> calibrate -> evaluate, the pipeline without its services), so the numbers are the ones a
report shows. Per trial: every metric of the new version and its gates, the wall-clock of the
unlearning and of the whole request (its stages without the services; the table turns it into
requests per hour on this device), the peak memory while it ran (GPU: torch's peak allocation; CPU: the process's
resident set, sampled), the sampling cost (diffusion: NFE and seconds per 1000 samples; LLM:
generated tokens per second with and without guidance) and, for LLMs, the Min-K% Prob
membership-inference AUC of the forgotten subjects against never-seen people
(forgetflow/llm/mia.py; 0.5 is the goal) and the forget quality against a model trained
without them (a KS-test p-value; only for the demo model, whose corpus the bench has).
Per method: mean and standard deviation over the seeds, for rates over few items a
bootstrap 95% interval (resampling n items with replacement from k hits is drawing
Binomial(n, k/n), so the interval is that distribution's 2.5 / 97.5 percentiles divided by n),
and the methods that dominate it on the family's trade-off axes (TRADEOFF).

Writes <out>/<UTC timestamp>-<family>/{results.json, results.md, tradeoff.png, seconds.png, gamma.png};
given a tracking URI, one MLflow parent run with a child run per method and seed. The folder
also keeps each trial as it ends, so a run cut short resumes (bench_folder.py).
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch

from forgetflow.bench_folder import BenchFolder
from forgetflow.compute import resolve_device
from forgetflow.config import DIFFUSION_ATTACKS, LLM_ATTACKS, Params, _deep_merge
from forgetflow.stats import clopper_pearson, upper_bound

FORGET_CLASS = 7  # the diffusion bench's request: forget this digit (the override rule picks its target)
FORGET_SUBJECTS = 4  # the LLM bench's request: forget the first customers of the roster
DIFFUSION_REAL_DATA = {"retrain": "trains on the real digits minus the class",
                       "esd": "fine-tunes on real digits of the class and of the rest"}
UNTARGETED = ("retrain", "esd")  # they redraw the class as some other digit, not as a chosen one
FROM_SERVING = ("sfd",)  # start, as a request does, from the one-step version distilled at registration
TIMES = ["unlearn_s", "request_s", "peak_memory_mb"]  # per trial, beside the family's metrics


@dataclass
class Trial:
    family: str
    method: str
    seed: int
    unlearn_s: float
    request_s: float  # the request's stages for this method, unlearn to evaluate (LLM: from synthesize)
    peak_memory_mb: float
    metrics: dict  # the new version's
    gates: list[dict]
    passed: bool
    items: dict = field(default_factory=dict)  # rate metric -> number of items it is over
    speed: dict = field(default_factory=dict)
    code: str | None = None  # the git commit the trial ran on ("+dirty": with uncommitted changes)
    curve: list[dict] = field(default_factory=list)  # the calibration sweep: GAMMA_AXIS per guidance scale


# The forgetting metric the gamma plot draws from each trial's calibration sweep.
GAMMA_AXIS = {"diffusion": "unlearning_accuracy", "llm": "served_leak_rate"}


def gamma_curve(curve: list[dict], family: str) -> list[dict]:
    """A calibration sweep as the bench keeps it: scale, space (LLM), the GAMMA_AXIS metric, passed."""
    keep = ("guidance_scale", "guidance_space", GAMMA_AXIS[family], "passed")
    return [{k: row[k] for k in keep if k in row} for row in curve]


def code_revision() -> str | None:
    """The commit of the code running now, "+dirty" with uncommitted changes (a resumed run may
    run on newer code than its first trials: each trial keeps its own)."""
    from forgetflow.report import code_revisions

    revs = code_revisions(Path(__file__).resolve().parent.parent)
    return revs["git"] and revs["git"][:12] + ("+dirty" if revs["git_dirty"] else "")


@contextmanager
def peak_memory(device: torch.device, every_s: float = 0.05):
    """Yields a dict whose "mb" holds, after the block, the peak memory during it."""
    out = {"mb": 0.0}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        out["mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        return
    proc, stop, peak = psutil.Process(), threading.Event(), [0]

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            stop.wait(every_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["mb"] = peak[0] / 2**20


def device_name(params: Params) -> str:
    """What the trials ran on, for the table's title: the GPU's name and precision, or the CPU's cores."""
    from forgetflow.compute import autocast_dtype

    device = resolve_device(params.compute)
    if device.type == "cuda":
        dtype = autocast_dtype(device, params.compute)
        return f"{torch.cuda.get_device_name(device)} ({str(dtype).removeprefix('torch.') if dtype else 'fp32'}, torch {torch.__version__})"
    return f"{device.type} ({torch.get_num_threads()} threads, torch {torch.__version__})"


def with_updates(params: Params, updates: dict) -> Params:
    """params with `updates` (a nested dict of fields) merged in, validated again."""
    return Params.model_validate(_deep_merge(params.model_dump(), updates))


def summarise(trials: list[Trial], keys: list[str]) -> dict[str, dict]:
    """method -> {key: {mean, sd, and for rates over items: ci95 and upper95, the exact
    (Clopper-Pearson) interval and one-sided bound of the hits pooled over seeds}} + seconds,
    memory, passed."""
    out: dict[str, dict] = {}
    for method in dict.fromkeys(t.method for t in trials):
        ts = [t for t in trials if t.method == method]
        row: dict = {"seeds": len(ts), "passed": sum(t.passed for t in ts)}
        for key in [*keys, *TIMES]:
            values = [v for t in ts if (v := _value(t, key)) is not None]
            if not values:
                row[key] = None
                continue
            stat = {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
            n = sum(t.items.get(key, 0) for t in ts)
            if n:
                hits = round(sum(v * t.items.get(key, 0) for t in ts if (v := _value(t, key)) is not None))
                stat["ci95"], stat["upper95"], stat["n"] = list(clopper_pearson(hits, n)), upper_bound(hits, n), n
            row[key] = stat
        out[method] = row
    return out


def _value(t: Trial, key: str) -> float | None:
    if key in TIMES:
        return getattr(t, key)
    value = t.speed.get(key, t.metrics.get(key))
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def attack_columns(attacks: dict[str, dict]) -> tuple[dict[str, float], dict[str, int]]:
    """A version's attack records as table columns attack_<name>: (rates, trials)."""
    return ({f"attack_{a}": r["rate"] for a, r in attacks.items()}, {f"attack_{a}": r["n"] for a, r in attacks.items()})


# ---- diffusion ---------------------------------------------------------------------------
DIFFUSION_KEYS = ["unlearning_accuracy", "override_fidelity", "remaining_accuracy_drop", "remaining_fd_ratio",
                  *[f"attack_{a}" for a in DIFFUSION_ATTACKS], "nfe", "seconds_per_1000_samples"]


def diffusion_trials(params: Params, folder: BenchFolder, methods: list[str], seeds: int, *, model_dir: Path | None,
                     eval_kit: Path | None, progress: bool) -> tuple[list[Trial], dict]:
    """(trials, setup seconds: "base" to build the demo teacher and judge (None for a given
    model), "serving" to distil the one-step version a registration makes (None if none)).
    The FROM_SERVING methods start from that version, as the pipeline's requests do; the
    others from the base. Trials `folder` already holds are kept, not run again."""
    from forgetflow.diffusion.attacks import run_attacks
    from forgetflow.diffusion.calibrate import calibrate_version, diffusion_gates
    from forgetflow.diffusion.evaluate import evaluate_version
    from forgetflow.diffusion.judge import train_judge
    from forgetflow.diffusion.methods import get_method
    from forgetflow.diffusion.sfd import RANDOM_OVERRIDE
    from forgetflow.diffusion.train_base import train_teacher
    from forgetflow.families.diffusion import DiffusionFamily, resolve_overrides
    from forgetflow.gates import all_passed, attack_gates

    device, work, done, code = resolve_device(params.compute), folder.work, folder.finished(), code_revision()
    base = Path(model_dir or folder.step("base", work / "base", lambda: train_teacher(
        params, work / "base", device=device, progress=progress)))
    judge = Path(eval_kit or folder.step("judge", work / "judge", lambda: train_judge(
        params, work / "judge", device=device, progress=progress)))
    card = json.loads((base / "model_card.json").read_text())
    targeted = tuple(resolve_overrides([FORGET_CLASS], {}, card, params.diffusion.sfd.override_rule)[0])
    ev, cache = params.diffusion.evaluate, work / "cache"
    serving = None
    if any(m in FROM_SERVING for m in methods):
        made = folder.step("serving", work / "serving", lambda: (m[0] if (m := DiffusionFamily().serving_version(
            base, judge, params, work / "serving", cache_dir=cache, progress=progress)) else None))
        serving = Path(made) if made else None
    setup = {"base": folder.seconds("base", "judge"), "serving": folder.seconds("serving") if serving else None}
    trials = []
    for method in methods:
        pair = (FORGET_CLASS, RANDOM_OVERRIDE) if method in UNTARGETED else targeted
        base_metrics = None
        for seed in range(seeds):
            if (method, seed) in done:
                trials.append(Trial(**done[(method, seed)]))
                continue
            base_metrics = base_metrics or evaluate_version(base, judge, [pair], params, seed=ev.seed, device=device,
                                                            cache_dir=cache)
            out = folder.trial_dir(method, seed)
            p = with_updates(params, {"diffusion": {"sfd": {"seed": seed}, "esd": {"seed": seed}, "base": {"seed": seed}}})
            start = time.perf_counter()
            with peak_memory(device) as mem:
                if method == "retrain":  # the gold standard: the teacher's recipe without the class
                    train_teacher(p, out, device=device, progress=progress, exclude_classes=[FORGET_CLASS])
                else:
                    start_from = serving if serving and method in FROM_SERVING else base
                    get_method(method).unlearn(start_from, out, [pair], p, device=device, progress=progress)
            seconds = time.perf_counter() - start
            curve = []
            if json.loads((out / "model_card.json").read_text())["kind"] == "one-step":  # a DDPM keeps its recipe's scale
                curve = calibrate_version(out, base, judge, [pair], p, device=device, cache_dir=cache)[1]
            new = evaluate_version(out, judge, [pair], p, seed=ev.seed, device=device, cache_dir=cache)
            request_s = time.perf_counter() - start
            new["attacks"].update(run_attacks(out, judge, [FORGET_CLASS], p, device=device, progress=progress))
            gates = diffusion_gates(base_metrics, new, p.diffusion.gates) + attack_gates(new["attacks"],
                                                                                          p.diffusion.gates.attacks)
            rates, trials_n = attack_columns(new["attacks"])
            new.update({**rates, **{g.name: g.value for g in gates if g.name in DIFFUSION_KEYS}})
            n_forget = new["samples"]["per_forget_class"]
            trials.append(Trial("diffusion", method, seed, round(seconds, 2), round(request_s, 2), round(mem["mb"], 1), new,
                                [g.to_dict() for g in gates], all_passed(gates),
                                items={"unlearning_accuracy": n_forget, "override_fidelity": n_forget, **trials_n}, code=code,
                                curve=gamma_curve(curve, "diffusion")))
            folder.record(asdict(trials[-1]))
    return trials, setup


# ---- LLM -----------------------------------------------------------------------------------
LLM_KEYS = ["guidance_scale", "leak_rate", *[f"attack_{a}" for a in LLM_ATTACKS], "retained_recall_drop",
            "utility_accuracy_drop", "perplexity_ratio", "mia_auc", "mia_auc_raw", "forget_quality", "tokens_per_s_guided",
            "tokens_per_s_unguided"]


def llm_trials(params: Params, folder: BenchFolder, methods: list[str], seeds: int, *, model_dir: Path | None,
               eval_kit: Path | None, progress: bool) -> tuple[list[Trial], dict]:
    """(trials, setup seconds: "base" to fine-tune the demo model and its never-trained
    reference, None for a given model). Trials `folder` already holds are kept, not run again."""
    from forgetflow.families.llm import LLMFamily
    from forgetflow.gates import all_passed
    from forgetflow.llm.evalkit import roster
    from forgetflow.llm.support_model import finetune_model, make_support_corpus
    from forgetflow.llm.synthesize import read_spec
    from forgetflow.request import parse_request

    device, work, done, code = resolve_device(params.compute), folder.work, folder.finished(), code_revision()
    demo = model_dir is None  # forget quality needs the training corpus: only for the demo model built here
    if demo:
        corpus, eval_kit = map(Path, folder.step("corpus", work / "support", lambda: make_support_corpus(
            params, work / "support")))
        model_dir = Path(folder.step("base", work / "support" / "model", lambda: finetune_model(
            corpus, work / "support" / "model", params, progress=progress)))
    family = LLMFamily()
    subjects = [{"name": c.name} for c in roster(eval_kit)[:FORGET_SUBJECTS]]
    retain_dir = Path(folder.step("never-trained", work / "never-trained", lambda: _never_trained(
        params, work, {s["name"] for s in subjects}, progress))) if demo else None
    setup = {"base": folder.seconds("corpus", "base", "never-trained")}
    trials = []
    for method in methods:
        for seed in range(seeds):
            if (method, seed) in done:
                trials.append(Trial(**done[(method, seed)]))
                continue
            out = folder.trial_dir(method, seed)
            p = with_updates(params, {"llm": {"unlearn": {"seed": seed}}})
            request = parse_request({"request_id": f"bench-{method}-{seed}", "model": "bench", "method": method,
                                     "target": {"kind": "llm-subjects", "subjects": subjects}})
            request_start = time.perf_counter()
            family.synthesize(request, model_dir, eval_kit, out / "synth", p)
            start = time.perf_counter()
            with peak_memory(device) as mem:
                family.unlearn(model_dir, out / "synth", out / "new", p, method=method, base_version="1",
                               checkpoints=None, progress=progress)
            seconds = time.perf_counter() - start
            _, curve = family.calibrate(model_dir, out / "new", out / "synth", eval_kit, p, out / "evaluation")
            metrics = family.evaluate(model_dir, out / "new", out / "synth", eval_kit, p, out / "evaluation")
            request_s = time.perf_counter() - request_start
            gates = family.gates(metrics, p)
            rates, trials_n = attack_columns(metrics["new"]["attacks"])
            new = {**metrics["new"], **rates, **{g.name: g.value for g in gates}}
            spec = read_spec(out / "synth")
            n_items = len(spec["items"])
            new.update(mia_auc=metrics["new"]["membership"]["served"]["auc"],
                       mia_auc_raw=metrics["new"]["membership"]["raw_weights"]["auc"],
                       forget_quality=_forget_quality(spec, model_dir, out / "new", p, retain_dir) if retain_dir else None)
            trials.append(Trial("llm", method, seed, round(seconds, 2), round(request_s, 2), round(mem["mb"], 1), new,
                                [g.to_dict() for g in gates], all_passed(gates),
                                items={"leak_rate": n_items, **trials_n},
                                speed=_tokens_per_second(out / "new", model_dir, p, device), code=code,
                                curve=gamma_curve(curve, "llm")))
            trials[-1].metrics["base"] = {**{k: v for k, v in metrics["base"].items() if not isinstance(v, dict)},
                                          "mia_auc": metrics["base"]["membership"]["raw_weights"]["auc"]}
            folder.record(asdict(trials[-1]))
    return trials, setup


def _forget_quality(spec: dict, base_dir: Path, new_dir: Path, params: Params, retain_dir: Path) -> float:
    """KS forget quality (forgetflow/llm/mia.py) of the new version's MinK scores on the
    forgotten answers against `retain_dir`'s, the same recipe trained without the forgotten
    subjects, both under the raw weights' policy."""
    from forgetflow.families.llm import _load
    from forgetflow.llm.attacks import Item
    from forgetflow.llm.corpus import CORPUS_QUESTIONS
    from forgetflow.llm.evaluate import raw_policy
    from forgetflow.llm.mia import forget_quality, min_k_scores

    k = params.llm.evaluate.mia_min_k
    forgotten = [Item(**it) for it in spec["items"] if it["field"] in CORPUS_QUESTIONS]
    model, tok, _ = _load(new_dir, params, parent=base_dir)
    unlearned = min_k_scores(model, tok, forgotten, k, raw_policy())
    model, tok, _ = _load(retain_dir, params)
    return forget_quality(unlearned, min_k_scores(model, tok, forgotten, k, raw_policy()))


def _never_trained(params: Params, work: Path, forgotten: set[str], progress: bool) -> Path:
    """The reference of forget quality: the demo recipe on the corpus without the forgotten people."""
    from forgetflow.llm.corpus import make_customers, support_chats, write_jsonl
    from forgetflow.llm.support_model import finetune_model

    c = params.llm.corpus
    kept = [x for x in make_customers(c.customers, c.seed) if x.name not in forgotten]
    corpus = write_jsonl(support_chats(kept, c.repeats, c.seed), work / "never-trained" / "corpus.jsonl")
    return finetune_model(corpus, work / "never-trained" / "model", params, progress=progress)


def _tokens_per_second(new_dir: Path, parent: Path, params: Params, device: torch.device) -> dict:
    """Greedy generation speed of the served version on general questions, guided at its
    calibrated scale (2 when it has none: the cost of guidance is the same at any gamma != 1)
    and unguided."""
    from forgetflow.families.llm import _load
    from forgetflow.llm.artifact import read_card
    from forgetflow.llm.chat import prompt_ids
    from forgetflow.llm.generation import generate

    card = read_card(new_dir)
    model, tok, _ = _load(new_dir, params, parent=parent)

    questions = [f"Tell me one fact about the number {i}." for i in range(params.llm.evaluate.batch_size)]
    pos = [prompt_ids(tok, card.positive_condition, q) for q in questions]
    neg = [prompt_ids(tok, card.negative_condition, q) for q in questions]
    ev, out = params.llm.evaluate, {}
    for name, gamma in (("tokens_per_s_guided", card.guidance_scale if card.guidance_scale != 1.0 else 2.0),
                        ("tokens_per_s_unguided", 1.0)):
        start = time.perf_counter()
        texts = generate(model, tok, pos, negative_prompts=neg, guidance_scale=gamma, max_new_tokens=ev.max_new_tokens,
                         batch_size=ev.batch_size)
        tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
        out[name] = tokens / (time.perf_counter() - start)
    return out


KEYS = {"diffusion": DIFFUSION_KEYS, "llm": LLM_KEYS}  # the metric columns of each family's table


# ---- run, write, log --------------------------------------------------------------------------
def methods_of(family: str) -> list[str]:
    if family == "diffusion":
        from forgetflow.diffusion.methods import DIFFUSION_METHODS

        return [*DIFFUSION_METHODS, "retrain"]
    from forgetflow.llm.methods import LLM_METHODS

    return list(LLM_METHODS)


def run_bench(family: str, params: Params, out_root: Path, *, seeds: int = 3, methods: list[str] | None = None,
              model_dir: Path | None = None, eval_kit: Path | None = None, tracking_uri: str | None = None,
              progress: bool = True, command: str | None = None, resume: Path | None = None,
              rerun: list[str] | None = None, on_folder: Callable[[Path], None] | None = None) -> Path:
    """Run the bench of one family; returns the results folder. `command`: the invocation that
    made it, recorded with the results. `resume`: the folder of a run that was cut short; its
    plan (family, methods, seeds, base, params) replaces the arguments, its finished trials are
    kept (bench_folder.py; ResumeError on another device), except those of the `rerun` methods,
    which are set aside and run again. `on_folder` is called with the results folder before the
    first trial runs."""
    if resume:
        folder = BenchFolder.resume(resume)
        params = Params.model_validate(folder.plan["params"])
        device = device_name(params)
        folder.check_device(device)
        folder.supersede(rerun or [])
    elif rerun:
        raise ValueError("--rerun goes with --resume (a new run runs every trial anyway)")
    else:
        device = device_name(params)
        known = methods_of(family)
        methods = methods or known
        if unknown := [m for m in methods if m not in known]:
            raise ValueError(f"unknown {family} methods {unknown}; known: {known}")
        folder = BenchFolder.create(out_root, {
            "family": family, "methods": methods, "seeds": seeds,  # absolute: a resume may run from elsewhere
            "model_dir": model_dir and Path(model_dir).resolve(), "eval_kit": eval_kit and Path(eval_kit).resolve(),
            "device": device, "command": command, "params": params.model_dump(mode="json")})
    if on_folder:
        on_folder(folder.path)
    plan = folder.plan
    family, methods, seeds = plan["family"], plan["methods"], plan["seeds"]
    run = diffusion_trials if family == "diffusion" else llm_trials
    trials, setup_s = run(params, folder, methods, seeds, model_dir=plan["model_dir"] and Path(plan["model_dir"]),
                          eval_kit=plan["eval_kit"] and Path(plan["eval_kit"]), progress=progress)
    summary = summarise(trials, KEYS[family])
    result = {"family": family, "created": plan["created"], "command": plan["command"],
              "resumed_by": command if resume else None, "seeds": seeds, "device": device, "methods": methods,
              "code": sorted({t.code or "unrecorded" for t in trials}), "setup_s": setup_s, "summary": summary,
              "dominated_by": dominated_by(summary, family),
              "superseded": [{k: t.get(k) for k in ("method", "seed", "code", "superseded")} for t in folder.superseded()],
              "trials": [asdict(t) for t in trials],
              "real_data": {m: DIFFUSION_REAL_DATA.get(m) for m in methods} if family == "diffusion" else {}}
    write_outputs(result, folder.path)
    if tracking_uri:
        log_to_mlflow(result, folder.path, tracking_uri)
    return folder.path


def write_outputs(result: dict, out: Path) -> None:
    """results.json, results.md and the plots of one bench result, in `out`."""
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "results.md").write_text(markdown_table(result))
    plot_bench(result, out)


# The trade-off axes of each family, with the better direction: -1 lower is better, +1 higher.
TRADEOFF = {"diffusion": {"unlearning_accuracy": 1, "remaining_accuracy_drop": -1, "remaining_fd_ratio": -1},
            "llm": {"leak_rate": -1, "retained_recall_drop": -1, "utility_accuracy_drop": -1, "perplexity_ratio": -1}}


def dominated_by(summary: dict, family: str) -> dict[str, list[str]]:
    """method -> the methods that dominate it on the family's TRADEOFF axes (means over seeds):
    at least as good on every axis and better on one. [] marks a point on the Pareto front."""
    axes = TRADEOFF[family]

    def point(row: dict) -> list[float] | None:
        if any(not row.get(k) for k in axes):
            return None
        return [sign * row[k]["mean"] for k, sign in axes.items()]  # higher is better on every axis

    points = {m: p for m, row in summary.items() if (p := point(row)) is not None}
    return {m: [o for o, q in points.items() if o != m and all(b >= a for a, b in zip(p, q)) and q != p]
            for m, p in points.items()}


def _num(x: float, digits: int) -> str:
    """Fixed point; significant digits for a value that has blown up (a collapsed model's
    perplexity reaches 1e39) or that fixed point would round to 0 (forget quality, a p-value)."""
    if abs(x) >= 1e6:
        return f"{x:.3g}"
    if 0 < abs(x) < 0.5 * 10 ** -digits:
        return f"{x:.2g}"
    return f"{x:.{digits}f}"


def _cell(stat: dict | None, digits: int = 3) -> str:
    if not stat:
        return "n/a"
    text = _num(stat["mean"], digits)
    if stat.get("sd"):
        text += f" ± {_num(stat['sd'], digits)}"
    if stat.get("ci95"):
        lo, hi = stat["ci95"]
        text += f" [{_num(lo, digits)}, {_num(hi, digits)}]"
    return text


def markdown_table(result: dict) -> str:
    keys = KEYS[result["family"]]
    cols = ["method", "gates passed", "dominated by", "unlearn s", "request s", "requests/h", "peak MB", *keys]
    dominance = result["dominated_by"]
    base_mia = [b for t in result["trials"] if (b := t["metrics"].get("base", {}).get("mia_auc")) is not None]
    lines = [f"# forgetflow bench: {result['family']}, {result['seeds']} seed(s), {result['device']}, {result['created']}",
             "", "mean ± sd over seeds [exact 95% interval over items pooled over seeds, for rates; attack columns: trials]; requests/h = 3600 / request s"
             + (f"; building the demo base took {setup['base']:.0f} s" if (setup := result["setup_s"])["base"] else "")
             + (f"; {', '.join(FROM_SERVING)} start(s) from the one-step version distilled once at registration "
                f"({setup['serving']:.0f} s, plain SiD)" if setup.get("serving") else "")
             + f"; dominated by: the methods at least as good on every one of {', '.join(TRADEOFF[result['family']])}"
               " and better on one (- : on the Pareto front)"
             + (f"; the base's mia_auc {np.mean(base_mia):.3f}" if base_mia else ""), "",
             *([f"made by `{result['command']}`" + (f", finished by `{result['resumed_by']}`" if result.get("resumed_by")
                                                      else ""), ""] if result.get("command") else []),
             *([f"code: {', '.join(codes)}" + (" (the trials ran on different code: see each trial's `code` in "
                                               "results.json)" if len(codes) > 1 else ""), ""]
               if (codes := result.get("code")) else []),
             *([f"rerun: {len(gone)} earlier trial(s) of {', '.join(sorted({t['method'] for t in gone}))} set aside "
                "(trials.superseded.jsonl)", ""] if (gone := result.get("superseded")) else []),
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for method, row in result["summary"].items():
        note = result["real_data"].get(method)
        name = f"{method} (real data: {note})" if note else method
        per_hour = f"{3600 / row['request_s']['mean']:.0f}" if row.get("request_s") else "n/a"
        cells = [name, f"{row['passed']}/{row['seeds']}", ", ".join(dominance.get(method, ["n/a"])) or "-",
                 _cell(row["unlearn_s"], 1), _cell(row["request_s"], 1), per_hour,
                 _cell(row["peak_memory_mb"], 0),
                 *[_cell(row[k], 1 if k.startswith(("tokens", "seconds", "nfe")) else 3) for k in keys]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_bench(result: dict, out: Path) -> None:
    """tradeoff.png: forgetting vs utility per method (mean, sd bars); seconds.png: unlearning
    time; gamma.png: each method's calibration sweep (seed 0), its forgetting metric against the
    guidance scale, a failed scale as x (none for trials run before the sweep was kept)."""
    from matplotlib.figure import Figure

    fx, fy = (("remaining_accuracy_drop", "unlearning_accuracy") if result["family"] == "diffusion"
              else ("retained_recall_drop", "leak_rate"))
    fig = Figure(figsize=(6, 4.5), dpi=120)
    ax = fig.subplots()
    dominance = result["dominated_by"]
    labels: dict[tuple[float, float], list[str]] = {}  # methods at the same point share one label
    for method, row in result["summary"].items():
        if row.get(fx) and row.get(fy):
            front = dominance.get(method) == []
            ax.errorbar(row[fx]["mean"], row[fy]["mean"], xerr=row[fx]["sd"], yerr=row[fy]["sd"], fmt="o", capsize=3,
                        color="tab:green" if front else "tab:gray")
            labels.setdefault((row[fx]["mean"], row[fy]["mean"]), []).append(method)
    for xy, methods in labels.items():
        ax.annotate(" = ".join(methods), xy, textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"{fx} (lower is better)")
    ax.set_ylabel(f"{fy} ({'higher' if fy == 'unlearning_accuracy' else 'lower'} is better)")
    ax.set_title(f"forgetting vs utility: {result['family']} (green: no method dominates it on "
                 f"{len(TRADEOFF[result['family']])} axes)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "tradeoff.png")
    fig = Figure(figsize=(6, 3.5), dpi=120)
    ax = fig.subplots()
    names = list(result["summary"])
    ax.bar(names, [result["summary"][m]["unlearn_s"]["mean"] for m in names],
           yerr=[result["summary"][m]["unlearn_s"]["sd"] for m in names], capsize=3)
    ax.set_ylabel("unlearning wall-clock (s)")
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(out / "seconds.png")
    curves = {t["method"]: t["curve"] for t in result["trials"] if t.get("curve") and t["seed"] == 0}
    if curves:
        _plot_gamma(curves, GAMMA_AXIS[result["family"]], out / "gamma.png")


def _plot_gamma(curves: dict[str, list[dict]], axis: str, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.subplots()
    for method, rows in curves.items():
        for space in dict.fromkeys(r.get("guidance_space") for r in rows):
            line = sorted((r for r in rows if r.get("guidance_space") in (space, None) or r["guidance_scale"] == 1.0),
                          key=lambda r: r["guidance_scale"])
            xs, ys = [r["guidance_scale"] for r in line], [r[axis] for r in line]
            drawn, = ax.plot(xs, ys, "-o", ms=3, label=f"{method} ({space})" if space else method)
            failed = [(x, y) for x, y, r in zip(xs, ys, line) if not r["passed"]]
            if failed:
                ax.scatter(*zip(*failed), marker="x", color=drawn.get_color(), s=40, zorder=3)
    ax.set_xlabel("guidance scale")
    ax.set_ylabel(axis)
    ax.set_title("calibration sweep per method (x: the scale failed a gate)", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)


def log_to_mlflow(result: dict, out: Path, tracking_uri: str) -> str:
    """One parent run (the summary table and plots) and a child run per method and seed."""
    from mlflow import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    client = MlflowClient(tracking_uri)
    name = "forgetflow/bench"
    experiment = client.get_experiment_by_name(name)
    exp_id = experiment.experiment_id if experiment else client.create_experiment(name)
    parent = client.create_run(exp_id, run_name=f"bench-{result['family']}-{result['created']}",
                               tags={"forgetflow.bench.family": result["family"]}).info.run_id
    for trial in result["trials"]:
        child = client.create_run(exp_id, run_name=f"{trial['method']}-seed{trial['seed']}",
                                  tags={MLFLOW_PARENT_RUN_ID: parent, "forgetflow.method": trial["method"]}).info.run_id
        client.log_param(child, "seed", trial["seed"])
        values = {**{key: trial[key] for key in TIMES},
                  "gates_passed": float(trial["passed"]), **trial["speed"],
                  **{k: v for k, v in trial["metrics"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}}
        for key, value in values.items():
            if value is not None and np.isfinite(value):
                client.log_metric(child, key, float(value))
        client.set_terminated(child)
    for name in ("results.json", "results.md", "tradeoff.png", "seconds.png", "gamma.png"):
        if (out / name).exists():
            client.log_artifact(parent, str(out / name))
    client.set_terminated(parent)
    return parent
