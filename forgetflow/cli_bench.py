"""`forgetflow bench`: every method of a family on one base model and one request, side by side
(forgetflow/bench.py); a table, a JSON file and plots per family, and MLflow runs."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer


def bench(ctx: typer.Context,
          family: str = typer.Option("all", help="diffusion | llm | all"),
          seeds: int = typer.Option(None, min=1, help="Seeds per method (mean and sd over them). [default: 3]"),
          methods: str = typer.Option(None, help="Comma-separated method names (default: every method of the family)."),
          out: Path = typer.Option(Path("bench/results"), help="Each run writes <out>/<timestamp>-<family>/."),
          model_dir: Path = typer.Option(None, help="Bench on your own base version (one family) instead of "
                                         "training the demo model."),
          eval_kit: Path = typer.Option(None, help="Its evaluation kit (the judge, or the LLM kit)."),
          mlflow: bool = typer.Option(True, help="Log a parent run and a child run per method and seed to MLflow."),
          resume: Path = typer.Option(None, help="Finish a run that was cut short: its results folder. Its own "
                                      "plan (family, methods, seeds, base, params) is run; finished trials "
                                      "are kept."),
          rerun: str = typer.Option(None, help="With --resume: comma-separated methods whose finished trials run "
                                    "again (set aside in trials.superseded.jsonl), e.g. after a fix to one method.")):
    """Run every method (or --methods) of a family on the same base and request: forgetting,
    utility, wall-clock, peak memory and sampling cost, mean ± sd over --seeds."""
    from forgetflow import cli
    from forgetflow.bench import methods_of, run_bench
    from forgetflow.bench_folder import BenchFolder, ResumeError

    o = cli._opts(ctx)
    if resume is not None:
        if seeds or methods or model_dir or eval_kit:
            cli._fail("--resume runs the folder's own plan: drop --seeds, --methods, --model-dir and --eval-kit")
        try:
            planned = BenchFolder.resume(resume).plan["family"]
        except ResumeError as exc:
            cli._fail(str(exc))
        if family not in ("all", planned):
            cli._fail(f"--resume {resume} is a {planned} bench, not {family}")
        family = planned
    seeds = seeds or 3
    families = ["diffusion", "llm"] if family == "all" else [family]
    if any(f not in ("diffusion", "llm") for f in families):
        cli._fail(f"unknown family {family!r}; known: diffusion, llm, all")
    if (model_dir is None) != (eval_kit is None) or (model_dir and len(families) > 1):
        cli._fail("--model-dir and --eval-kit go together, with one --family")
    chosen = [m.strip() for m in methods.split(",")] if methods else None
    tracking = cli._guard(cli._connect, o)[1].mlflow_uri if mlflow else None
    params = cli.load_params(o.params_path, preset=o.preset)
    started: list[Path] = []

    def announce(folder: Path) -> None:
        started.append(folder)
        cli.console.print(f"bench folder: {folder} (if cut short: forgetflow bench --resume {folder})", soft_wrap=True)
        sys.stdout.flush()  # a kill (not an interrupt) must still find the line in a redirected log

    for fam in families:
        picked = [m for m in chosen if m in methods_of(fam)] if chosen and len(families) > 1 else chosen
        try:
            folder = run_bench(fam, params, out, seeds=seeds, methods=picked, model_dir=model_dir, eval_kit=eval_kit,
                               tracking_uri=tracking, command=shlex.join(["forgetflow", *sys.argv[1:]]), resume=resume,
                               rerun=[m.strip() for m in rerun.split(",")] if rerun else None, on_folder=announce)
        except ValueError as exc:
            cli._fail(str(exc))
        except KeyboardInterrupt:
            cli._fail(f"interrupted; the finished trials are kept: forgetflow bench --resume {started[-1]}"
                      if started else "interrupted before the bench folder was made", code=130)
        cli.console.print((folder / "results.md").read_text(), markup=False, highlight=False)
        cli.console.print(f"results: {folder}/results.json, results.md, tradeoff.png, seconds.png, gamma.png", soft_wrap=True)
