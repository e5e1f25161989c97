"""Continual training over a sequence of tasks: the data module's schedule, the accuracy matrix and its
summaries (hand-computed), and the evaluation callback through a real Trainer (JSON + PNG)."""

from __future__ import annotations

import json

import pytest
from lightning.pytorch import Callback, Trainer

from lightning_sd import OnPolicyGeneration, SamplingConfig, SelfDistillationModule
from lightning_sd.callbacks.continual import ContinualEvaluation, continual_metrics, plot_matrix
from lightning_sd.data.records import DataError
from lightning_sd.data.sequence import SequentialTasksDataModule, TaskSpec, check_sequence

TASKS = [{"task": "fictional_facts", "task_kwargs": {"n_facts": 4, "world_seed": 1}, "label": "facts_a"},
         {"task": "fictional_facts", "task_kwargs": {"n_facts": 4, "world_seed": 2}, "label": "facts_b"}]
PROBES = [{"task": "real_capitals", "task_kwargs": {"n_facts": 4}, "n_eval": 4, "label": "capitals"}]



def sequence(tok, steps=2, batch_size=2, **kw) -> SequentialTasksDataModule:
    return SequentialTasksDataModule(tok, tasks=TASKS, probes=PROBES, steps_per_task=steps, batch_size=batch_size,
                                     n_train=6, n_eval=4, **kw)


def test_metrics_by_hand():
    r = [[0.9, None, None], [0.6, 0.8, None], [0.5, 0.7, 0.9]]
    got = continual_metrics(r)
    assert got["avg_accuracy"] == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    assert got["bwt"] == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert got["forgetting"] == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)
    # forgetting is measured from each task's best earlier accuracy, BWT from the accuracy right after it
    r = [[0.2, None, None], [0.6, 0.5, None], [0.4, 0.3, 0.9]]
    got = continual_metrics(r)
    assert got["bwt"] == pytest.approx(0.0) and got["forgetting"] == pytest.approx(0.2)
    assert continual_metrics([[0.7]]) == {"avg_accuracy": 0.7, "bwt": None, "forgetting": None}
    with pytest.raises(ValueError, match="row 1"):
        continual_metrics([[0.7, None], [0.5, None]])


def test_plot_is_a_png(tmp_path):
    path = plot_matrix(str(tmp_path / "m.png"), [[0.5, None], [0.25, 1.0]], ["a", "b"], initial=[0.0, 0.0, 1.0],
                       probes=[[1.0], [0.5]], probe_labels=["p"])
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.endswith("m.png")


def test_schedule_trains_task_after_task_and_shards_ranks(tiny):
    _, tok = tiny
    dm = sequence(tok, steps=3)
    order = [r["sequence_task"] for r in dm.schedule()]
    assert order == ["facts_a"] * 6 + ["facts_b"] * 6  # 3 steps x batch 2 per task
    assert [r["sequence_task"] for r in dm.schedule(accumulate=2)] == ["facts_a"] * 12 + ["facts_b"] * 12
    ranks = [dm.schedule(world_size=2, rank=k) for k in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 12
    assert [r["sequence_task"] for r in ranks[1]] == order
    first = {r["id"] for r in ranks[0][:6]} | {r["id"] for r in ranks[1][:6]}
    assert len(first) == 6  # ranks see different facts-A records in the same step (6 records, 12 slots)
    assert dm.stage_of_step(0) == dm.stage_of_step(2) == 0 and dm.stage_of_step(3) == 1 and dm.stage_of_step(99) == 1
    uneven = sequence(tok, steps=[1, 2])
    assert [r["sequence_task"] for r in uneven.schedule()] == ["facts_a"] * 2 + ["facts_b"] * 4
    assert uneven.boundaries == [1, 3]


def test_records_are_tagged_and_verified_by_their_own_task(tiny):
    _, tok = tiny
    dm = sequence(tok)
    dm.setup("fit")
    a = dm.stages["facts_a"].eval_records[0]
    b = dm.stages["facts_b"].eval_records[0]
    assert a["answer"] != b["answer"] and a["id"].startswith("facts_a/") and b["sequence_task"] == "facts_b"
    assert dm.task.verify(a, f"It is {a['answer']}.").reward == 1.0
    assert dm.task.verify(a, f"It is {b['answer']}.").reward == 0.0
    assert {r["sequence_task"] for r in dm.eval_dataloader("capitals").dataset} == {"capitals"}
    assert dm.probe_task("capitals") is dm.stages["capitals"].task
    assert len(dm.val_dataloader().dataset) == 4 + 4  # the tasks; the probe is evaluated apart


def test_sequence_options_are_checked(tiny):
    _, tok = tiny
    assert check_sequence({"tasks": TASKS, "steps_per_task": None}, max_steps=6) == [3, 3]
    assert check_sequence({"tasks": TASKS}, max_steps=5) == [2, 3]  # the remainder goes to the last task
    assert check_sequence({"tasks": TASKS, "steps_per_task": 2}, max_steps=4) == [2, 2]
    with pytest.raises(DataError, match="set trainer.max_steps=6"):
        check_sequence({"tasks": TASKS, "steps_per_task": 3}, max_steps=5)
    with pytest.raises(DataError, match="fewer than the 2 tasks"):
        check_sequence({"tasks": TASKS}, max_steps=1)
    with pytest.raises(DataError, match="unique"):
        check_sequence({"tasks": TASKS + TASKS[:1]}, max_steps=6)
    with pytest.raises(DataError, match=r"tasks\[0\] has unknown key"):
        check_sequence({"tasks": [{"task": "arithmetic", "n_step": 2}]}, max_steps=6)
    with pytest.raises(DataError, match="unknown task"):
        check_sequence({"tasks": [{"task": "nope"}]}, max_steps=6)
    SequentialTasksDataModule(tok, tasks=[TaskSpec("arithmetic", label="x")], steps_per_task=1)


def test_callback_fills_the_matrix_at_each_boundary_and_writes_json_and_png(tiny, tmp_path):
    model, tok = tiny
    dm = sequence(tok, steps=2)
    module = SelfDistillationModule(model, tok, teacher="ema", teacher_kwargs={"rate": 0.01},
                                    loss={"name": "continual", "template": "demonstration", "skip_first": 3,
                                          "reduction": "sequence_mean"},
                                    task=dm.task, eval_sampling=SamplingConfig(do_sample=False, max_new_tokens=4))
    cb = ContinualEvaluation(dm, run_dir=str(tmp_path))
    real = cb._accuracy
    calls = []

    def scripted(pl_module, labels):  # the real evaluation runs; the numbers are scripted to check the bookkeeping
        measured = real(pl_module, labels)
        assert set(measured) == set(labels) and all(0.0 <= v <= 1.0 for v in measured.values())
        step = pl_module.trainer.global_step
        calls.append((step, list(labels)))
        return {label: round(0.1 * step + 0.01 * k, 4) for k, label in enumerate(labels)}

    cb._accuracy = scripted
    trained = []

    class Seen(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            trained.append({r["sequence_task"] for r in batch.records})

    Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=str(tmp_path),
            callbacks=[OnPolicyGeneration(SamplingConfig(max_new_tokens=4)), cb, Seen()]).fit(module, datamodule=dm)
    assert trained == [{"facts_a"}, {"facts_a"}, {"facts_b"}, {"facts_b"}]
    assert calls == [(0, ["facts_a", "facts_b", "capitals"]), (2, ["facts_a", "capitals"]),
                     (4, ["facts_a", "facts_b", "capitals"])]
    result = json.loads((tmp_path / "continual.json").read_text())
    assert result["matrix"] == [[0.2, None], [0.4, 0.41]]
    assert result["probe_accuracy"] == [[0.21], [0.42]]
    assert result["initial"] == {"facts_a": 0.0, "facts_b": 0.01, "capitals": 0.02}
    assert result["summary"]["bwt"] == pytest.approx(0.4 - 0.2)
    assert result["summary"]["forgetting"] == pytest.approx(0.2 - 0.4)
    assert result["summary"]["avg_accuracy"] == pytest.approx((0.4 + 0.41) / 2)
    assert (tmp_path / "continual.png").read_bytes()[:4] == b"\x89PNG"
    state = cb.state_dict()
    fresh = ContinualEvaluation(dm)
    fresh.load_state_dict(state)
    assert fresh.matrix() == cb.matrix() and fresh.initial == cb.initial
