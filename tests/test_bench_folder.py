"""The bench's results folder as a run writes it (no models): trials kept as they end, setup
steps built once, and a resume refused where its trials would not compare."""
import pytest

from forgetflow.bench_folder import TRIALS, BenchFolder, ResumeError

PARAMS = {"llm": {"unlearn": {"epochs": 4, "lr": 0.001}}, "compute": {"device": "auto"}}


def test_finished_trials_survive_a_torn_last_line(tmp_path):
    folder = BenchFolder.create(tmp_path, {"family": "llm", "methods": ["a"], "seeds": 2, "device": "cpu",
                                           "params": PARAMS})
    assert folder.path.name.endswith("-llm") and folder.plan["created"] in folder.path.name
    folder.record({"method": "a", "seed": 0, "unlearn_s": 1.5})
    with (folder.path / TRIALS).open("a") as f:
        f.write('{"method": "a", "seed": 1, "unlea')  # killed mid-write
    assert folder.finished() == {("a", 0): {"method": "a", "seed": 0, "unlearn_s": 1.5}}
    folder.record({"method": "a", "seed": 1, "unlearn_s": 2.5})  # the resumed run's, on a line of its own
    assert folder.finished()[("a", 1)] == {"method": "a", "seed": 1, "unlearn_s": 2.5}


def test_a_setup_step_is_built_once_and_its_seconds_are_kept(tmp_path):
    folder = BenchFolder.create(tmp_path, {"family": "llm", "methods": [], "seeds": 1, "device": "cpu",
                                           "params": PARAMS})
    built = []

    def build():
        (folder.work / "base").mkdir()
        built.append(1)
        return folder.work / "base"

    (folder.work / "base").mkdir()  # what a killed build left: removed before building again
    assert folder.step("base", folder.work / "base", build) == folder.work / "base"
    again = BenchFolder.resume(folder.path)
    assert again.step("base", again.work / "base", build) == str(folder.work / "base") and built == [1]
    assert again.seconds("base") >= 0 and again.seconds("never-trained") is None


def test_a_resume_on_another_device_or_of_no_bench_folder_is_refused(tmp_path):
    folder = BenchFolder.create(tmp_path, {"family": "llm", "methods": [], "seeds": 1, "device": "cpu",
                                           "params": PARAMS})
    BenchFolder.resume(folder.path).check_device("cpu")
    with pytest.raises(ResumeError, match="ran on cpu, this one would run on NVIDIA H100"):
        BenchFolder.resume(folder.path).check_device("NVIDIA H100")
    with pytest.raises(ResumeError, match="not a bench folder"):
        BenchFolder.resume(tmp_path)


def test_rerun_sets_a_methods_trials_aside_and_keeps_the_others(tmp_path):
    folder = BenchFolder.create(tmp_path, {"family": "llm", "methods": ["ours", "peer"], "seeds": 2, "device": "cpu",
                                           "params": PARAMS})
    for method in ("ours", "peer"):
        for seed in (0, 1):
            folder.trial_dir(method, seed).mkdir(parents=True)
            folder.record({"method": method, "seed": seed, "code": "old"})
    again = BenchFolder.resume(folder.path)
    assert sorted(again.supersede(["ours"])) == [("ours", 0), ("ours", 1)]
    assert sorted(again.finished()) == [("peer", 0), ("peer", 1)]
    assert [(t["method"], t["seed"], t["code"]) for t in again.superseded()] == [("ours", 0, "old"), ("ours", 1, "old")]
    assert not (again.work / "ours-seed0").exists() and (again.work / "peer-seed0").is_dir()
    assert again.supersede(["ours"]) == []  # nothing left to set aside: a second resume keeps what the first ran
    with pytest.raises(ResumeError, match="--rerun grad-ascent: not a method of this run"):
        again.supersede(["grad-ascent"])
