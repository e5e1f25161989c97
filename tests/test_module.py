"""SelfDistillationModule + OnPolicyGeneration + teacher policies, on tiny models, through a real Trainer."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_batch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader

from lightning_sd import OnPolicyGeneration, SamplingConfig, SelfDistillationModule
from lightning_sd.rollout import rollout_on


def loader(tok, records, batches: int = 1):
    return DataLoader([records] * batches, batch_size=None, collate_fn=lambda recs: make_batch(tok, recs))


def trainer(steps: int = 1, callbacks=(), **kw) -> Trainer:
    return Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks), **kw)


class Capture(Callback):
    """Keeps every training batch's loss terms and the module outputs."""

    def __init__(self):
        self.losses, self.batches = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]) if outputs is not None else None)
        self.batches.append(batch)


def test_live_teacher_with_student_prompt_gives_exactly_zero_loss(tiny, records):
    """Teacher = student weights, teacher prompt = student prompt: every per-token divergence must be exactly 0.
    Prompts of different lengths (different left padding) and several samples per prompt."""
    model, tok = tiny
    module = SelfDistillationModule(model, tok, teacher="live", loss={"template": "student_prompt"})
    cap = Capture()
    gen = OnPolicyGeneration(SamplingConfig(n=2, max_new_tokens=12, temperature=1.5))
    trainer(2, [gen, cap]).fit(module, loader(tok, records, 2))
    for batch in cap.batches:
        terms = batch.loss_terms
        assert terms["mask"].sum() > 0
        assert torch.count_nonzero(terms["per_token"] * terms["mask"]) == 0
    assert cap.losses == [0.0, 0.0]


def test_zero_loss_holds_for_every_divergence(tiny, records):
    model, tok = tiny
    for loss in ({"beta": 1.0}, {"beta": 0.5}, {"support": "topk", "top_k": 5, "topk_from": "teacher"},
                 {"support": "sampled", "beta": 1.0}, {"temperature": 1.1, "entry_clip": 0.05}):
        module = SelfDistillationModule(model, tok, teacher="live", loss={"template": "student_prompt", **loss})
        cap = Capture()
        trainer(1, [OnPolicyGeneration(SamplingConfig(max_new_tokens=6)), cap]).fit(module, loader(tok, records))
        assert cap.losses == [0.0], loss


def test_student_changes_and_frozen_teacher_does_not(tiny, records):
    model, tok = tiny
    module = SelfDistillationModule(model, tok, teacher="frozen", optimizer={"lr": 1e-2})
    before = copy.deepcopy(model.state_dict())
    teacher_before = copy.deepcopy(module.teacher.model.state_dict())
    trainer(2, [OnPolicyGeneration(SamplingConfig(max_new_tokens=8))]).fit(module, loader(tok, records, 2))
    changed = [k for k in before if not torch.equal(before[k], model.state_dict()[k])]
    assert changed, "student weights did not change"
    for k, v in module.teacher.model.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert all(not p.requires_grad for p in module.teacher.parameters())


def test_optimizer_holds_student_parameters_only(tiny):
    model, tok = tiny
    module = SelfDistillationModule(model, tok, teacher="ema", teacher_kwargs={"rate": 0.5})
    tr = trainer(1)
    module.trainer = tr
    opt = module.configure_optimizers()["optimizer"]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters()}
    assert not in_opt & {id(p) for p in module.teacher.parameters()}


def test_optimizer_is_fused_by_default_on_one_device_and_can_be_switched_off(tiny):
    model, tok = tiny
    for cfg, expected in (({}, True), ({"fused": False}, False), ({"name": "sgd", "lr": 0.1}, True)):
        module = SelfDistillationModule(model, tok, teacher="frozen", optimizer=cfg)
        module.trainer = trainer(1)
        opt = module.configure_optimizers()["optimizer"]
        assert bool(opt.defaults["fused"]) is expected, cfg


def test_gradients_are_dropped_right_after_the_optimizer_step(tiny, records):
    """Lightning would zero them only inside the next step's closure, after its rollout and forwards: the
    previous step's gradients would sit through the memory peak. With accumulation they live until the step."""
    model, tok = tiny
    seen = []

    class Grads(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(sum(p.grad is not None for p in pl_module.student.parameters()))

    module = SelfDistillationModule(model, tok, teacher="frozen", optimizer={"lr": 1e-3})
    trainer(2, [Grads(), OnPolicyGeneration(SamplingConfig(max_new_tokens=4))],
            accumulate_grad_batches=2).fit(module, loader(tok, records, 4))
    n = sum(1 for _ in model.parameters())
    assert seen == [0, n, 0, n]  # kept between the micro-batches of one step, gone after each step
    assert all(p.grad is None for p in model.parameters())


def test_ema_teacher_equals_hand_computed_update(tiny, records):
    model, tok = tiny
    rate = 0.25
    module = SelfDistillationModule(model, tok, teacher="ema", teacher_kwargs={"rate": rate},
                                    optimizer={"name": "sgd", "lr": 0.5})
    expected = {k: v.clone() for k, v in module.teacher.model.state_dict().items()}

    class Track(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            # after this batch's optimizer step the EMA must be (1-rate)*previous + rate*student
            student = pl_module.student.state_dict()
            for k in expected:
                if expected[k].is_floating_point():
                    expected[k] = (1 - rate) * expected[k] + rate * student[k]

    # the module's own hook runs before the callbacks' -> compare after training
    trainer(3, [OnPolicyGeneration(SamplingConfig(max_new_tokens=6)), Track()]).fit(module, loader(tok, records, 3))
    for k, v in module.teacher.model.state_dict().items():
        assert torch.allclose(v, expected[k], atol=1e-6), k


def test_ema_updates_once_per_optimizer_step_not_per_micro_batch(tiny, records):
    model, tok = tiny
    module = SelfDistillationModule(model, tok, teacher="ema", teacher_kwargs={"rate": 0.5})
    calls = []
    original = module.teacher.after_optimizer_step
    module.teacher.after_optimizer_step = lambda student: (calls.append(1), original(student))
    trainer(2, [OnPolicyGeneration(SamplingConfig(max_new_tokens=4))], accumulate_grad_batches=2).fit(
        module, loader(tok, records, 4))
    assert len(calls) == 2  # 4 micro-batches, 2 optimizer steps


def test_ema_teacher_is_restored_from_checkpoint_and_frozen_is_not_saved(tiny, records, tmp_path):
    from lightning_sd.models import load_model

    model, tok = tiny
    module = SelfDistillationModule(model, tok, teacher="ema", teacher_kwargs={"rate": 0.3}, optimizer={"lr": 1e-2})
    tr = trainer(2, [OnPolicyGeneration(SamplingConfig(max_new_tokens=6))])
    tr.fit(module, loader(tok, records, 2))
    path = tmp_path / "ema.ckpt"
    tr.save_checkpoint(path)
    fresh_model, _ = load_model("tiny", seed=0)
    restored = SelfDistillationModule(fresh_model, tok, teacher="ema", teacher_kwargs={"rate": 0.3})
    state = torch.load(path, weights_only=False)
    restored.load_state_dict(state["state_dict"], strict=False)
    for (k, v), (_, w) in zip(module.teacher.model.state_dict().items(), restored.teacher.model.state_dict().items()):
        assert torch.equal(v, w), k
    assert any(k.startswith("teacher.") for k in state["state_dict"])

    frozen = SelfDistillationModule(load_model("tiny", seed=0)[0], tok, teacher="frozen")
    tr2 = trainer(1, [OnPolicyGeneration(SamplingConfig(max_new_tokens=4))])
    tr2.fit(frozen, loader(tok, records))
    tr2.save_checkpoint(tmp_path / "frozen.ckpt")
    saved = torch.load(tmp_path / "frozen.ckpt", weights_only=False)["state_dict"]
    assert not any(k.startswith("teacher.") for k in saved)


def test_trust_region_teacher_interpolates_logits(tiny, records):
    from lightning_sd.forward import completion_logits

    model, tok = tiny
    module = SelfDistillationModule(model, tok, teacher="trust_region", teacher_kwargs={"mix": 0.25})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = make_batch(tok, records)
    ids = torch.randint(0, 200, (4, 5))
    mask = torch.ones_like(ids)
    run = lambda net: completion_logits(net, batch.prompt_ids, batch.prompt_mask, ids, mask)  # noqa: E731
    got = module.teacher.score(model, run)
    with torch.no_grad():
        expected = 0.75 * run(module.teacher.model) + 0.25 * run(model)
    assert torch.allclose(got, expected, atol=1e-5)


def test_teacher_inputs_hold_context_and_student_inputs_do_not(tiny, records):
    model, tok = tiny
    module = SelfDistillationModule(model, tok, teacher="frozen", loss={"template": "self_critique_v3"})
    batch = make_batch(tok, records)
    batch.rollout = rollout_on(None, module, model, batch.prompt_ids, batch.prompt_mask,
                                  SamplingConfig(n=2, max_new_tokens=4), seed=0)
    inputs = module.build_teacher_inputs(batch)
    for r in range(inputs.prompt_ids.size(0)):
        teacher_text = tok.decode(inputs.prompt_ids[r][inputs.prompt_mask[r].bool()])
        student_text = tok.decode(batch.rollout.prompt_ids[r][batch.rollout.prompt_mask[r].bool()])
        solution = records[r // 2]["solution"]
        assert solution in teacher_text and solution not in student_text
        assert records[r // 2]["prompt"] in teacher_text


def test_missing_generation_callback_is_a_clear_error(tiny, records):
    model, tok = tiny
    module = SelfDistillationModule(model, tok, teacher="live")
    with pytest.raises(RuntimeError, match="OnPolicyGeneration"):
        trainer(1).fit(module, loader(tok, records))


def test_drop_in_with_users_own_trainer_and_loop(tiny, records, tmp_path):
    """The documented drop-in use (docs/api.md): build in plain Python, hand to your own Trainer."""
    from lightning.pytorch.loggers import CSVLogger

    from lightning_sd import LossConfig
    from lightning_sd.methods import DistillOptions

    model, tok = tiny
    module = SelfDistillationModule(
        model, tok, teacher="ema", teacher_kwargs={"rate": 0.05},
        loss=LossConfig(beta=0.0, skip_first=1, reduction="sequence_mean",
                        options=DistillOptions(template="demonstration")),
        optimizer={"lr": 1e-3}, scheduler={"name": "cosine", "warmup_steps": 1})
    t = Trainer(max_steps=3, accelerator="cpu", logger=CSVLogger(tmp_path), enable_progress_bar=False,
                callbacks=[OnPolicyGeneration(SamplingConfig(n=2, max_new_tokens=8, top_p=0.95))],
                default_root_dir=tmp_path, enable_checkpointing=False, log_every_n_steps=1)
    t.fit(module, loader(tok, records, 3))
    assert t.global_step == 3
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    for key in ("train/loss", "train/divergence", "train/completion_len", "train/truncated",
                "train/gen_tokens_per_s", "train/train_tokens_per_s"):
        assert key in metrics, key


def test_documented_trainer_logs_training_metrics():
    """Every `Trainer(...)` in docs/api.md logs within its run: `log_every_n_steps` <= `max_steps` (Lightning's
    default of 50 never logs a training metric in a 40-step run)."""
    import ast
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    calls = [node for block in re.findall(r"```python\n(.*?)```", doc, re.S) for node in ast.walk(ast.parse(block))
             if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Trainer"]
    assert calls
    for call in calls:
        kw = {k.arg: k.value for k in call.keywords}
        steps = ast.literal_eval(kw["max_steps"]) if "max_steps" in kw else None
        every = ast.literal_eval(kw["log_every_n_steps"]) if "log_every_n_steps" in kw else 50
        assert steps is None or every <= steps, ast.unparse(call)


@pytest.mark.filterwarnings("error:.*checkpointing.*deprecated:FutureWarning")
def test_gradient_checkpointing_is_off_during_sampling_and_restored(tiny, records):
    """...by transformers' current method names: the deprecated ones would warn on every rollout."""
    from lightning_sd.models import enable_activation_checkpointing

    model, tok = tiny
    enable_activation_checkpointing(model)
    module = SelfDistillationModule(model, tok, teacher="live", loss={"template": "student_prompt"})
    seen = []
    original = model.forward

    def spy(*a, **kw):
        seen.append((model.training, model.is_activation_checkpointing, torch.is_grad_enabled()))
        return original(*a, **kw)

    model.forward = spy
    batch = make_batch(tok, records)
    model.train()
    rollout_on(None, module, model, batch.prompt_ids, batch.prompt_mask, SamplingConfig(max_new_tokens=3), 0)
    assert seen and all(s == (False, False, False) for s in seen)
    assert model.training and model.is_activation_checkpointing


def test_a_student_loaded_in_eval_mode_trains_in_train_mode_and_the_teacher_copy_stays_in_eval(tiny, records):
    """`from_pretrained` returns a model in eval mode and Lightning keeps submodule modes: without
    `on_train_start` the student trained in eval mode, with Hugging Face's gradient checkpointing silently off
    (found through peak memory, docs/performance.md)."""
    model, tok = tiny
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.eval()
    module = SelfDistillationModule(model, tok, teacher="frozen", loss={"template": "student_prompt"})
    modes = []

    class Spy(Callback):
        def on_before_backward(self, trainer, pl_module, loss):
            layer = pl_module.student.model.layers[0]
            modes.append((pl_module.student.training, layer.training, layer.gradient_checkpointing,
                          pl_module.teacher.model.training))

    trainer(2, [OnPolicyGeneration(SamplingConfig(max_new_tokens=3)), Spy()]).fit(module, loader(tok, records, 2))
    assert modes == [(True, True, True, False)] * 2


def test_a_step_batch_moves_to_the_device_as_a_dataclass(tiny, records):
    """Lightning's batch transfer (the strategy's `batch_to_device`, through the module's `transfer_batch_to_device`)
    gives back a `StepBatch`: its tensors and the rollout's moved, its lists, strings and numbers kept."""
    from lightning_sd.batch import StepBatch

    model, tok = tiny
    module = SelfDistillationModule(model, tok, teacher="live", loss={"name": "distill", "template": "student_prompt"})
    batch = make_batch(tok, records)
    batch.rollout = rollout_on(None, module, model, batch.prompt_ids, batch.prompt_mask, SamplingConfig(max_new_tokens=2),
                               0)
    batch.completion_text, batch.rewards, batch.gen_seconds = ["a"] * len(records), [1.0, None] * 2, 0.5
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    trainer.strategy.connect(module)
    target = torch.device("meta")  # a device other than the batch's: every tensor must move
    moved = trainer.strategy.batch_to_device(batch, target)
    assert isinstance(moved, StepBatch)
    assert moved.prompt_ids.device == target and moved.prompt_mask.device == target
    assert moved.rollout.completion_ids.device == target and moved.rollout.prompt_index.device == target
    assert moved.records == records and moved.prompt_text == batch.prompt_text
    assert (moved.completion_text, moved.rewards, moved.gen_seconds) == (["a"] * 4, [1.0, None] * 2, 0.5)
    assert batch.prompt_ids.device.type == "cpu"  # the collator's batch itself is left as it was


def test_a_plain_dict_batch_from_ones_own_loader_becomes_a_step_batch(tiny, records):
    from lightning_sd.batch import StepBatch, as_step_batch

    model, tok = tiny
    module = SelfDistillationModule(model, tok, teacher="live", loss={"name": "distill", "template": "student_prompt"})
    made = make_batch(tok, records)
    plain = {"records": made.records, "prompt_ids": made.prompt_ids, "prompt_mask": made.prompt_mask}
    batch = module.on_before_batch_transfer(plain, 0)
    assert isinstance(batch, StepBatch) and batch.prompt_ids is made.prompt_ids and batch.rollout is None
    assert as_step_batch(made) is made
    with pytest.raises(ValueError, match=r"missing \['prompt_mask'\], unknown \['labels'\]"):
        as_step_batch({"records": made.records, "prompt_ids": made.prompt_ids, "labels": 1})



def test_training_with_a_data_module_does_not_warn_about_the_batch_hook(tiny):
    """The module's `on_before_batch_transfer` (plain dicts become `StepBatch`es) is meant to win over a data
    module's: Lightning's note about it is not shown to users."""
    import warnings

    from lightning_sd.callbacks import OnPolicyGeneration
    from lightning_sd.data.datamodule import PromptDataModule

    model, tok = tiny
    module = SelfDistillationModule(model, tok, teacher="live", loss={"name": "distill", "template": "answer_hint"})
    dm = PromptDataModule(tok, task="arithmetic", task_kwargs={"n_steps": 1}, n_train=4, n_eval=2, batch_size=2)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      callbacks=[OnPolicyGeneration(SamplingConfig(max_new_tokens=2))])
    with warnings.catch_warnings(record=True) as caught:
        trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 1
    assert not [w for w in caught if "on_before_batch_transfer" in str(w.message)]


def test_the_step_opens_its_profiler_spans_inside_lightnings(tiny, records, tmp_path):
    """`trainer.profiler`: the step's own spans open and close in order, inside Lightning's training step, after
    the rollout's callback span; `build_profiler` writes Lightning's report with them into the run folder."""
    from lightning.pytorch.profilers import Profiler

    from lightning_sd.build import build_profiler

    class Log(Profiler):
        def __init__(self):
            super().__init__()
            self.events = []

        def start(self, action_name):
            self.events.append(("start", action_name))

        def stop(self, action_name):
            self.events.append(("stop", action_name))

    model, tok = tiny
    log = Log()
    module = SelfDistillationModule(model, tok, teacher="frozen")
    trainer(1, [OnPolicyGeneration(SamplingConfig(max_new_tokens=4))], profiler=log).fit(module, loader(tok, records))
    names = [name for _, name in log.events]
    ours = [(kind, name) for kind, name in log.events if name.startswith("[step]")]
    assert ours == [(k, f"[step]{n}") for n in ("teacher_prompts", "teacher_forward", "student_forward", "loss")
                    for k in ("start", "stop")]
    step_start = names.index("[Strategy]SingleDeviceStrategy.training_step")
    step_stop = len(names) - 1 - names[::-1].index("[Strategy]SingleDeviceStrategy.training_step")
    rollout_stop = len(names) - 1 - names[::-1].index("[Callback]OnPolicyGeneration.on_train_batch_start")
    assert rollout_stop < step_start < names.index("[step]teacher_prompts") and names.index("[step]loss") < step_stop
    with SelfDistillationModule(model, tok).span("anything"):  # no trainer attached: nothing to do
        pass
    assert build_profiler(None, str(tmp_path)) is None
    simple = build_profiler("simple", str(tmp_path))
    trainer(1, [OnPolicyGeneration(SamplingConfig(max_new_tokens=4))], profiler=simple).fit(
        SelfDistillationModule(model, tok, teacher="frozen"), loader(tok, records))
    report = (tmp_path / "fit-profile.txt").read_text()
    assert "[step]teacher_forward" in report and "[step]loss" in report
