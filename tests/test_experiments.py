"""The evidence experiments (experiments/*.py) in miniature: `model=tiny`, one seed, a few steps, so the scripts
cannot rot. Also the pieces they rely on: `PeriodicEvaluation` and `kl_from_reference`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

TINY = ["model=tiny", "data.n_train=8", "data.n_eval=4", "data.batch_size=4", "trainer.max_steps=2",
        "generation.max_new_tokens=8", "eval.max_new_tokens=8"]


def _run(name: str, tmp_path: Path, extra: list[str], more: list[str] = ()) -> tuple[dict, Path]:
    import importlib

    import evidence

    script = importlib.import_module(name)
    out = tmp_path / "results"
    argv = [f"out_dir={out}", f"work_dir={tmp_path / 'work'}", "seeds=[0]", "parallel=0", *more, "--", *extra]
    summary = evidence.main(name, script.row, script.plot, argv=argv)
    return summary, out


def _check_outputs(name: str, out: Path, arms: list[str]) -> dict:
    res = json.loads((out / "results.json").read_text())
    assert set(res["summary"]) == set(arms)
    assert len(res["runs"]) == len(arms)
    for run in res["runs"]:  # each result records config, seed, commit and machine
        assert run["seed"] == 0 and run["config"]["seed"] == 0 and run["config"]["data"]["seed"] == 0
        assert "git_commit" in run and run["machine"]["cpu_count"] >= 1
        assert (out / "runs" / run["arm"] / "seed0" / "result.json").is_file()
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert sorted(r["arm"] for r in rows) == sorted(arms)
    assert (out / f"{name}.png").stat().st_size > 10_000
    assert "| arm | metric |" in (out / "summary.md").read_text()
    return res


def test_knowledge_injection_tiny(tmp_path):
    _, out = _run("knowledge_injection", tmp_path, TINY, ["~arms.continual_lr5e-5_60steps"])
    res = _check_outputs("knowledge_injection", out, ["sft", "continual"])
    for run in res["runs"]:
        c = run["continual"]
        assert c["tasks"] == ["facts_a", "facts_b"] and len(c["matrix"]) == 2  # the accuracy matrix
        assert run["drift"]["tokens"] > 0 and run["drift"]["kl_mean"] >= 0
        by_task = run["before"]["by_task"]
        assert set(by_task) == {"facts_a", "facts_b", "known_facts"}
        # the teacher-with-context accuracy exists only where the loss shows a teacher a context (not SFT)
        assert all((v["teacher_accuracy"] is not None) == (run["arm"] == "continual") for v in by_task.values())
        # the pooled "before" numbers come from the per-task evaluations (weighted by n), not a second pass
        n = sum(v["n"] for v in by_task.values())
        assert run["before"]["n"] == n
        assert abs(run["before"]["student_accuracy"] - sum(v["student_accuracy"] * v["n"] for v in by_task.values()) / n) < 1e-12
    row = res["rows"][0]
    for key in ("facts_a_after_facts_a", "facts_a_after_facts_b", "facts_b_after_facts_b",
                "known_facts_after_facts_b", "forgetting", "bwt", "drift_kl"):
        assert key in row


def test_frontier_tiny_writes_the_plot_and_the_verdict(tmp_path):
    from omegaconf import OmegaConf

    arms = OmegaConf.load(ROOT / "experiments" / "conf" / "frontier.yaml").arms
    _, out = _run("frontier", tmp_path, TINY + ["trainer.max_steps=2"],
                  [f"~arms.{a}" for a in arms if a != "sd05_lr1e-4_s20"])
    res = _check_outputs("frontier", out, ["sd05_lr1e-4_s20"])
    for key in ("facts_b_after_facts_b", "facts_a_after_facts_b", "known_facts_after_facts_b", "drift_kl"):
        assert key in res["rows"][0]
    assert res["runs"][0]["drift"]["prompts"] == "eval"  # the test part of the general prompts
    assert "Met in each seed: seed 0: no" in (out / "verdict.md").read_text()  # nothing learned in 2 steps


def test_learning_curves_tiny_records_known_facts_and_training_seconds_at_each_point(tmp_path):
    _, out = _run("learning_curves", tmp_path, TINY + ["trainer.max_steps=2", "trainer.checkpoint_every_n_steps=null"],
                  ["~arms.sft", "~arms.sd0", "~arms.sd05", "measure.curve_every=1", "measure.drift=false"])
    res = _check_outputs("learning_curves", out, ["sd1"])
    curve = res["runs"][0]["curve"]
    assert [p["step"] for p in curve] == [0, 1, 2] and all("known_facts" in p["probes"] for p in curve)
    assert curve[0]["train_seconds"] == 0 < curve[1]["train_seconds"] <= curve[2]["train_seconds"]
    assert {"test_at_2", "known_at_2", "seconds_at_2", "steps_to_80"} <= set(res["rows"][0])


def test_frontier_verdict_compares_each_point_with_every_sft_point_at_least_as_good():
    from frontier import verdict

    def r(arm, seed, new, known, drift, a):
        return {"arm": arm, "seed": seed, "facts_b_after_facts_b": new, "known_facts_after_facts_b": known,
                "drift_kl": drift, "facts_a_after_facts_b": a}

    rows = [r("sft_a", 0, 0.9, 0.5, 0.2, 0.5), r("sft_b", 0, 0.7, 0.9, 0.05, 0.9),  # sft_b learns less: not a rival
            r("sd05_x", 0, 0.85, 0.7, 0.1, 0.5), r("sd0_y", 0, 0.95, 0.9, 0.1, 0.9), r("sd1_z", 0, 0.6, 1.0, 0.0, 1.0),
            r("sft_a", 1, 0.9, 0.5, 0.2, 0.5), r("sd05_x", 1, 0.85, 0.69, 0.1, 0.5)]
    got = {(v["arm"], v["seed"]): v for v in verdict(rows)}
    assert set(got) == {("sd05_x", 0), ("sd0_y", 0), ("sd05_x", 1)}  # sd1_z is under 80% new facts
    assert got[("sd05_x", 0)]["met"] and [c["sft"] for c in got[("sd05_x", 0)]["rivals"]] == ["sft_a"]
    assert not got[("sd0_y", 0)]["met"] and got[("sd0_y", 0)]["rivals"] == []  # no SFT point reaches 95%: no win
    assert not got[("sd05_x", 1)]["met"]  # 19 points more known facts, not 20


def test_self_critique_arithmetic_tiny_and_resume_skips_finished_runs(tmp_path):
    _, out = _run("self_critique_arithmetic", tmp_path, TINY)
    res = _check_outputs("self_critique_arithmetic", out, ["base", "sft", "self_critique"])
    by_arm = {r["arm"]: r for r in res["runs"]}
    assert by_arm["base"]["generated_tokens"] == 0 and by_arm["sft"]["generated_tokens"] == 0  # SFT samples nothing
    assert by_arm["self_critique"]["generated_samples"] == 2 * 4  # 2 steps x 4 prompts x n=1
    assert by_arm["self_critique"]["after_sampled"]["n_samples"] == 2 * 4  # 2 samples per held-out prompt
    assert by_arm["self_critique"]["before"]["teacher_accuracy"] is not None
    import report  # the docs/results.md table of this experiment, from results.json

    text = report.table("self_critique_arithmetic", res)
    assert "| self_critique |" in text and "| base |" in text and "seeds [0]" in text
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed0/result.json")}
    _run("self_critique_arithmetic", tmp_path, TINY)  # again: every run is already done, nothing reruns
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed0/result.json")} == stamps


def test_rl_feedback_vs_grpo_tiny_in_subprocesses(tmp_path):
    extra = [*TINY, "data.batch_size=1", "generation.n=4"]
    _, out = _run("rl_feedback_vs_grpo", tmp_path, extra, ["parallel=2", "measure.curve_every=1"])
    res = _check_outputs("rl_feedback_vs_grpo", out, ["grpo", "rl_feedback"])
    import report

    assert "accuracy after 8 samples" in report.table("rl_feedback_vs_grpo", res)
    for run in res["runs"]:  # equal generation budget: 2 steps x 1 prompt x 4 rollouts
        assert [p["samples"] for p in run["curve"]] == [0, 4, 8]
        assert [p["step"] for p in run["curve"]] == [0, 1, 2]
        assert run["generated_samples"] == 8
        assert [h["step"] for h in run["history"]] == [0, 1] and all("reward" in h for h in run["history"])
        assert not (tmp_path / "work" / run["arm"] / "seed0" / "checkpoints").exists()  # removed once done


def test_rl_feedback_json_draws_its_curve_from_sampled_accuracy(tmp_path):
    extra = [*TINY, "data.n_eval=3", "generation.n=2"]
    _, out = _run("rl_feedback_json", tmp_path, extra, ["measure.curve_every=2", "~arms.grpo", "~arms.rl_feedback",
                                                        "~arms.rl_feedback_optuna"])
    res = _check_outputs("rl_feedback_json", out, ["rl_feedback_mix09"])
    import report

    table = report.table("rl_feedback_json", res)
    assert "greedy after" in table and "mean training reward" in table
    run = res["runs"][0]
    assert run["config"]["data"]["eval_split"] == "eval" and run["config"]["data"]["task"] == "json_format"
    # the step-0 point is measured with sampling (2 samples per prompt), not copied from the greedy evaluation
    assert [p["step"] for p in run["curve"]] == [0, 2] and [p["n"] for p in run["curve"]] == [6, 6]
    assert run["before"]["n"] == 3


def test_a_bad_arm_is_named_before_anything_runs(tmp_path):
    import evidence

    exp = evidence.compose_experiment("rl_feedback_vs_grpo", [f"out_dir={tmp_path}", "arms.grpo.overrides=['loss=nope']"])
    with pytest.raises(ValueError, match="arm 'grpo'"):
        evidence.check_experiment(exp)


def test_an_arm_that_lists_seeds_runs_only_those(tmp_path):
    import evidence

    exp = evidence.compose_experiment("rl_feedback_vs_grpo", [f"out_dir={tmp_path}", "seeds=[0,1,2]",
                                                              "+arms.grpo.seeds=[1]"])
    evidence.check_experiment(exp)
    runs = [(s["arm"], s["seed"]) for s in evidence.plan(exp)]
    assert runs == [("rl_feedback", 0), ("grpo", 1), ("rl_feedback", 1), ("rl_feedback", 2)]
    exp = evidence.compose_experiment("rl_feedback_vs_grpo", [f"out_dir={tmp_path}", "seeds=[0]",
                                                              "+arms.grpo.seeds=[5]"])
    with pytest.raises(ValueError, match=r"arm 'grpo' lists seeds \[5\], none of which is in seeds \[0\]"):
        evidence.check_experiment(exp)


def test_kl_from_reference_is_zero_for_the_same_model_and_positive_after_a_change(tiny):
    from lightning_sd.evaluation import kl_from_reference
    from lightning_sd.models import load_model

    model, tok = tiny
    same = kl_from_reference(model, model, tok, ["Hello there", "What is 2 + 2?"], max_new_tokens=6)
    assert same["tokens"] > 0 and same["kl_mean"] == 0.0
    other, _ = load_model("tiny", seed=0)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    moved = kl_from_reference(model, other, tok, ["Hello there", "What is 2 + 2?"], max_new_tokens=6)
    assert moved["kl_mean"] > 1e-4 and len(moved["kl_per_prompt"]) == 2


def test_kl_from_reference_matches_a_float64_loop(tiny):
    """The mean over completion tokens of sum_v M(v) (log M(v) - log R(v)), recomputed by hand from full
    forward passes of the prompt + greedy completion."""
    from lightning_sd.data.prompts import encode_prompts, format_prompt
    from lightning_sd.evaluation import kl_from_reference
    from lightning_sd.models import load_model
    from lightning_sd.sampling import SamplingConfig, sample

    model, tok = tiny
    ref, _ = load_model("tiny", seed=1)
    res = kl_from_reference(model, ref, tok, ["Name a color."], max_new_tokens=5)
    enc = encode_prompts(tok, [format_prompt(tok, "Name a color.")])
    model.eval()
    roll = sample(model, enc.ids, enc.mask, SamplingConfig(do_sample=False, max_new_tokens=5),
                  pad_token_id=tok.pad_token_id, stop_token_ids=[tok.eos_token_id])
    n = int(roll.completion_mask.sum())
    full = torch.cat([enc.ids, roll.completion_ids[:, :n]], 1)
    with torch.no_grad():
        lm = model(full).logits[0].double().log_softmax(-1)
        lr = ref(full).logits[0].double().log_softmax(-1)
    p = enc.ids.size(1)
    kls = [float((lm[t].exp() * (lm[t] - lr[t])).sum()) for t in range(p - 1, p - 1 + n)]
    assert res["tokens"] == n
    assert abs(res["kl_mean"] - sum(kls) / n) < 1e-5


def test_periodic_evaluation_counts_rollouts_and_survives_a_resume():
    from lightning_sd.callbacks import PeriodicEvaluation

    cb = PeriodicEvaluation(3, batches=[])
    cb.points, cb.samples, cb.tokens, cb._steps.last_step = [{"step": 3, "samples": 24}], 24, 300, 3
    again = PeriodicEvaluation(3, batches=[])
    again.load_state_dict(cb.state_dict())
    assert (again.points, again.samples, again.tokens, again._steps.last_step) == (cb.points, 24, 300, 3)
    assert cb.state_dict()["last_step"] == 3  # the key of checkpoints written before
    with pytest.raises(ValueError, match="every_n_steps"):
        PeriodicEvaluation(0, batches=[])


def test_an_interrupted_run_resumes_from_its_last_checkpoint(tmp_path):
    """A run that stopped after its checkpoint but before its result continues from `last.ckpt`."""
    extra = [*TINY, "data.batch_size=1", "generation.n=2", "trainer.checkpoint_every_n_steps=1"]
    more = ["~arms.rl_feedback", "keep_checkpoints=true", "measure.curve_every=1"]
    _, out = _run("rl_feedback_vs_grpo", tmp_path, extra, more)
    result = out / "runs" / "grpo" / "seed0" / "result.json"
    first = json.loads(result.read_text())
    assert first["resumed_from"] is None and [p["step"] for p in first["curve"]] == [0, 1, 2]
    result.unlink()  # as if the process died after the step-2 checkpoint, before writing its result
    _, out = _run("rl_feedback_vs_grpo", tmp_path, [*extra, "trainer.max_steps=3"], more)
    again = json.loads(result.read_text())
    assert again["resumed_from"] and again["resumed_from"].endswith("last.ckpt")
    assert [p["step"] for p in again["curve"]] == [0, 1, 2, 3]  # the curve so far came back with the checkpoint
    assert again["generated_samples"] == 3 * 2 and again["before"] == first["before"]


def test_default_run_script_records_each_seed_and_renders_its_table(tmp_path):
    import default_run
    import report

    out = tmp_path / "results"
    argv = ["--seeds", "0", "--out-dir", str(out), "--work-dir", str(tmp_path / "work"), "--",
            "model=tiny", "data.n_train=8", "data.n_eval=4", "data.batch_size=4", "trainer.max_steps=2",
            "generation.max_new_tokens=6", "eval.max_new_tokens=6"]
    res = default_run.main(argv)
    run = json.loads((out / "runs" / "default" / "seed0" / "result.json").read_text())
    assert run["command"].startswith("train.py seed=0 data.seed=0 generation.seed=0")
    assert run["wall_seconds"] > 0 and run["git_commit"] and len(run["machine"]["load_avg"]) == 3
    assert run["metrics"]["eval_before"]["n"] == 4 and "train_diagnostics" in run["metrics"]
    assert res["summary"]["default"]["test_after"]["n"] == 1
    for key in ("known_before", "known_after", "steps_on_own_samples"):  # the probe and the lmbda coin's share
        assert res["summary"]["default"][key]["n"] == 1, key
    text = report.table("default_run", json.loads((out / "results.json").read_text()))
    assert "| default |" in text and "seeds [0]" in text
    stamp = (out / "runs" / "default" / "seed0" / "result.json").stat().st_mtime_ns
    default_run.main(argv)  # again: the seed is already done, nothing reruns
    assert (out / "runs" / "default" / "seed0" / "result.json").stat().st_mtime_ns == stamp


def test_the_result_tables_in_the_docs_are_up_to_date():
    """docs/results.md and docs/recipes.md hold no hand-typed numbers: their tables are what
    experiments/report.py renders from the committed results."""
    import report

    assert report.main(["--check"]) == 0, "run python experiments/report.py"


def test_teacher_probe_reports_zero_disagreement_for_the_students_own_prompt(tmp_path):
    """The probe on the tiny model: the student's own prompt as the teacher context disagrees nowhere (every KL
    and advantage exactly 0); a context with the answer in view does disagree; the table renders."""
    import teacher_probe

    result = teacher_probe.main(["--model", "tiny", "--problems", "2", "--samples", "2", "--max-new-tokens", "6",
                                 "--templates", "student_prompt", "answer_note", "--out", str(tmp_path)])
    own, note = result["templates"]["student_prompt"], result["templates"]["answer_note"]
    for key in ("kl_digits", "kl_other", "kl_first", "advantage_wrong"):
        assert own[key] in (0.0, None), (key, own[key])
    assert note["kl_first"] > 0
    assert own["p_opens_with_digit"] == pytest.approx(result["student_p_opens_with_digit"])
    assert "| `answer_note` |" in (tmp_path / "summary.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["rollouts"] == 4


def test_results_stored_with_the_former_loss_key_names_still_read():
    import evidence

    stored = {"config": {"loss": {"name": "rl_feedback", "template": "sdpo", "lam": 1.0}}}
    assert evidence.has_teacher(stored) is False  # grpo_mix=1: GRPO alone, no teacher
    stored["config"]["loss"]["lam"] = 0.5
    assert evidence.has_teacher(stored) is True


def test_git_commit_names_the_checkout_and_marks_uncommitted_changes(tmp_path):
    """Every record (train.py's metrics.json, the experiments' and benchmarks' results) names its code this way."""
    import subprocess

    from lightning_sd.logging_utils import git_commit

    assert git_commit(tmp_path) is None  # not a git work tree
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.txt").write_text("one")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    (tmp_path / "untracked.txt").write_text("not part of the code")
    assert git_commit(tmp_path) == head
    (tmp_path / "a.txt").write_text("two")
    assert git_commit(tmp_path) == head + "+dirty"
