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
