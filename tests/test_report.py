"""Reports: the contract keys, a self-contained page, figures inlined, errors shown."""
import json

import pytest

from forgetflow.gates import Gate
from forgetflow.plots import plot_guidance_curve, plot_metric_bars
from forgetflow.report import REPORT_KEYS, build_report, pipeline_overhead, render_html, write_report


def test_report_files_and_page(tmp_path):
    metrics = {"base": {"unlearning_accuracy": 0.01, "remaining_fd": 30.0},
               "new": {"unlearning_accuracy": 1.0, "remaining_fd": 31.0}}
    gates = [Gate("unlearning_accuracy", 1.0, 0.98, "min").to_dict(), Gate("remaining_fd_ratio", 1.4, 1.25, "max").to_dict()]
    curve = [{"guidance_scale": 1.0, "unlearning_accuracy": 0.95, "passed": False},
             {"guidance_scale": 1.5, "unlearning_accuracy": 1.0, "passed": True}]
    figs = [plot_guidance_curve(curve, 1.0, tmp_path / "guidance_curve.png"),
            plot_metric_bars(metrics, ["unlearning_accuracy", "remaining_fd"], tmp_path / "metric_bars.png")]
    report = build_report(request_id="r1", status="rejected", model="m", family="diffusion", method="sfd",
                          base_version="1", new_version="2", guidance_scale=1.0, metrics=metrics, gates=gates,
                          durations_s={"unlearn": 12.5}, error="gates failed: remaining_fd_ratio")
    path = write_report(report, tmp_path / "out", figs)
    data = json.loads(path.read_text())
    assert set(data) == set(REPORT_KEYS) and data["created"]
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "FAIL" in page and "gates failed: remaining_fd_ratio" in page and "Status: rejected" in page


def test_gate_semantics_and_unknown_report_fields():
    assert Gate("a", 0.99, 0.98, "min").passed and not Gate("a", 0.97, 0.98, "min").passed
    assert Gate("b", 1.2, 1.25, "max").passed and not Gate("b", 1.3, 1.25, "max").passed
    assert Gate("a", 1.0, 0.5, "min").margin == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown report fields"):
        build_report(request_id="r", colour="red")


def test_pipeline_overhead_is_the_share_outside_training_and_evaluation():
    durations = {"intake": 4.0, "synthesize": 1.0, "unlearn": 60.0, "calibrate": 20.0, "evaluate": 10.0,
                 "promote": 2.0, "total": 100.0}
    assert pipeline_overhead(durations) == pytest.approx(0.10)
    assert pipeline_overhead({"unlearn": 60.0}) is None  # a failed run has no total
    page_report = build_report(request_id="r", status="promoted", durations_s=durations, pipeline_overhead=0.1)
    assert "Pipeline overhead (outside training and evaluation): 10.0%" in render_html(page_report, [])


def test_a_concept_report_names_the_concept_by_salted_hash_only():
    from forgetflow.diffusion.concepts import build_prompt_forget, card_records
    from forgetflow.diffusion.captions import vocabulary

    forgotten = card_records(build_prompt_forget(vocabulary(), "seven", "eight", forgotten=[]).forget, "req-9")
    report = build_report(request_id="req-9", status="promoted", model="digits-t2i", family="diffusion", method="sfd")
    weights = {"version": "2", "files": {}, "sha256": "0" * 64}
    certificate = {"forgotten": forgotten, "gates": [], "key_shredding": {"requests": []}, "base": weights,
                   "new": weights, "signature": {"key_id": "k"}, "timestamps": {"certified": "now"}}
    page = render_html(report, [], certificate)
    assert f"Stop generating 1 concept, shown here only as salted hashes: {forgotten[0]['concept']}" in page
    assert "seven" not in page and "\u201ceight\u201d" in page
