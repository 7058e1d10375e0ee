"""The bench table's trade-off column: which methods dominate which (no services, no models)."""
from forgetflow.bench import dominated_by


def _row(**means):
    return {k: {"mean": v, "sd": 0.0} for k, v in means.items()}


def test_dominance_on_every_llm_axis():
    summary = {
        "ours": _row(leak_rate=0.0, retained_recall_drop=0.12, utility_accuracy_drop=-0.03, perplexity_ratio=0.6),
        "peer": _row(leak_rate=0.02, retained_recall_drop=0.09, utility_accuracy_drop=0.005, perplexity_ratio=1.2),
        "worse": _row(leak_rate=0.02, retained_recall_drop=0.12, utility_accuracy_drop=0.01, perplexity_ratio=1.2),
        "same": _row(leak_rate=0.0, retained_recall_drop=0.12, utility_accuracy_drop=-0.03, perplexity_ratio=0.6),
        "unmeasured": {"leak_rate": None},
    }
    result = dominated_by(summary, "llm")
    # a trade-off (ours forgets more, peer keeps more) is not dominance; a tie is not either
    assert result["ours"] == [] and result["peer"] == [] and result["same"] == []
    assert sorted(result["worse"]) == ["ours", "peer", "same"]
    assert "unmeasured" not in result


def test_higher_unlearning_accuracy_is_better_for_diffusion():
    summary = {"sfd": _row(unlearning_accuracy=1.0, remaining_accuracy_drop=0.0, remaining_fd_ratio=1.0),
               "sid": _row(unlearning_accuracy=0.01, remaining_accuracy_drop=0.0, remaining_fd_ratio=1.0)}
    assert dominated_by(summary, "diffusion") == {"sfd": [], "sid": ["sfd"]}


def test_a_cell_prints_a_blown_up_or_tiny_value_in_significant_digits():
    from forgetflow.bench import _cell

    assert _cell({"mean": 1.4281934442701786e39, "sd": 0.0}) == "1.43e+39"  # a collapsed model's perplexity
    assert _cell({"mean": 0.717, "sd": 0.02, "ci95": [0.5, 0.9]}) == "0.717 ± 0.020 [0.500, 0.900]"
    assert _cell({"mean": 786.97, "sd": 0.0}, 1) == "787.0" and _cell(None) == "n/a"
    assert _cell({"mean": 1.1965e-4, "sd": 0.0}) == "0.00012" and _cell({"mean": 0.0, "sd": 0.0}) == "0.000"


def test_the_results_carry_the_front_and_the_table_and_plot_read_it(tmp_path):
    """write_outputs from trials: results.json holds the dominance computed once; the table
    prints it (- on the front); both plots are written."""
    import json
    from dataclasses import asdict

    from forgetflow.bench import KEYS, Trial, dominated_by, summarise, write_outputs

    def trial(method, seed, leak, recall_drop):
        metrics = {"leak_rate": leak, "retained_recall_drop": recall_drop, "utility_accuracy_drop": 0.0,
                   "perplexity_ratio": 1.0}
        curve = [{"guidance_scale": 1.0, "guidance_space": "log", "served_leak_rate": leak + 0.1, "passed": False},
                 {"guidance_scale": 2.0, "guidance_space": "log", "served_leak_rate": leak, "passed": leak == 0.0},
                 {"guidance_scale": 2.0, "guidance_space": "prob", "served_leak_rate": leak, "passed": False}]
        return Trial("llm", method, seed, 10.0 + seed, 20.0 + seed, 500.0, metrics, [], leak == 0.0,
                     items={"leak_rate": 16}, speed={}, curve=curve)

    trials = [trial(m, s, leak, drop) for s in (0, 1) for m, leak, drop in
              (("ours", 0.0, 0.1), ("peer", 0.2, 0.1), ("keeper", 0.5, 0.0))]
    summary = summarise(trials, KEYS["llm"])
    trials[-1].code = "0123456789ab+dirty"  # a resumed run's last trial, on newer code
    result = {"family": "llm", "created": "now", "command": None, "seeds": 2, "device": "cpu", "methods": list(summary),
              "code": sorted({t.code or "unrecorded" for t in trials}),
              "superseded": [{"method": "ours", "seed": 0, "code": "fedcba987654", "superseded": "then"}],
              "setup_s": {"base": None}, "summary": summary, "dominated_by": dominated_by(summary, "llm"),
              "trials": [asdict(t) for t in trials], "real_data": {}}
    write_outputs(result, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["dominated_by"] == {
        "ours": [], "peer": ["ours"], "keeper": []}
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in (tmp_path / "results.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| method")}
    assert rows["ours"][1:3] == ["2/2", "-"] and rows["peer"][1:3] == ["0/2", "ours"] and rows["keeper"][2] == "-"
    assert (tmp_path / "tradeoff.png").stat().st_size > 5000 and (tmp_path / "seconds.png").stat().st_size > 5000
    assert (tmp_path / "gamma.png").stat().st_size > 5000
    table = (tmp_path / "results.md").read_text()
    assert "code: 0123456789ab+dirty, unrecorded (the trials ran on different code" in table
    assert "rerun: 1 earlier trial(s) of ours set aside (trials.superseded.jsonl)" in table


def test_a_trial_records_the_commit_it_ran_on():
    import subprocess
    from pathlib import Path

    from forgetflow.bench import code_revision

    root = Path(__file__).resolve().parent.parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    assert code_revision().split("+")[0] == head[:12]
