"""Single-process pieces of scale-out: strategy objects from the trainer options, rank-consistent decisions,
EMA on local shards, and the vLLM backend parts that need no vLLM (name mapping, LoRA merge, log-probs)."""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

import pytest
import torch

from lightning_sd import distributed as D
from lightning_sd.models import load_model

CONF = os.path.join(os.path.dirname(__file__), "..", "conf")
TRAINER_OPTIONS = sorted(f[:-5] for f in os.listdir(os.path.join(CONF, "trainer")) if f.endswith(".yaml"))
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(os.path.abspath(CONF), version_base="1.3"):
        return compose("train", overrides=["model=tiny", "data.n_train=4", "data.n_eval=2", *overrides])


def test_trainer_options_share_keys():
    """Composed as train.py composes them (an option may start from `cpu` and list only what it changes)."""
    keys = {name: tuple(_compose(f"trainer={name}").trainer.keys()) for name in TRAINER_OPTIONS}
    assert {"cpu", "gpu", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"} <= set(keys)
    first = keys["cpu"]
    assert all(k == first for k in keys.values()), keys


@pytest.mark.parametrize("option", TRAINER_OPTIONS)
def test_build_run_for_every_trainer_option(option):
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from lightning_sd.build import build_run

    run = build_run(_compose(f"trainer={option}"))
    if option.startswith("deepspeed") and not HAS_DEEPSPEED:  # Lightning's name; its Trainer asks to install it
        assert run.trainer_kwargs["strategy"] == {"deepspeed_zero2": "deepspeed_stage_2",
                                                  "deepspeed_zero3": "deepspeed_stage_3"}[option]
        with pytest.raises(Exception, match="(?i)deepspeed"):
            from lightning.pytorch.strategies import StrategyRegistry

            StrategyRegistry.get(run.trainer_kwargs["strategy"])
        return
    strategy = run.trainer_kwargs["strategy"]
    expected = {"cpu": "single", "gpu": "single", "ddp_cpu": "ddp", "ddp": "ddp", "fsdp": "fsdp"}.get(option, "deepspeed")
    assert (D.strategy_kind(strategy) if not isinstance(strategy, str) else "single") == expected
    if option == "fsdp":
        assert isinstance(strategy, FSDPStrategy)
        policy = strategy.kwargs["auto_wrap_policy"]
        names = {c.__name__ for c in (policy._module_classes if hasattr(policy, "_module_classes") else policy)}
        assert names == {"LlamaDecoderLayer", "LlamaForCausalLM"}
        assert strategy.kwargs["use_orig_params"] is True
    if option in ("ddp", "ddp_cpu"):
        assert isinstance(strategy, DDPStrategy)
    from lightning_sd.callbacks.generation import OnPolicyGeneration

    gen = [c for c in run.callbacks if isinstance(c, OnPolicyGeneration)]
    assert len(gen) == 1 and gen[0].gather_weights is True and gen[0].backend is None


def test_build_run_with_lora_and_gradient_checkpointing():
    pytest.importorskip("peft")
    from lightning_sd.build import build_run
    from lightning_sd.config import ConfigError

    run = build_run(_compose("+model.lora={r: 4, alpha: 8}", "trainer.gradient_checkpointing=true", "teacher=ema"))
    student = run.module.student
    assert hasattr(student, "peft_config") and set(student.peft_config) == {"default", "ema"}
    assert student.get_base_model().is_gradient_checkpointing
    with pytest.raises(ConfigError, match="model.lora: unknown key"):
        build_run(_compose("+model.lora={rank: 4}"))


def test_vllm_backend_needs_importance_correction():
    from lightning_sd.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match="loss.is_clip"):
        validate_config(_compose("generation.backend=vllm"))


@pytest.mark.parametrize("overrides,engine_dtype", [([], "float32"), (["generation.dtype=bf16"], "bfloat16")])
def test_the_vllm_engine_samples_in_generation_dtype_else_the_students(overrides, engine_dtype, tmp_path):
    from lightning_sd.build import build_run
    from lightning_sd.models import load_model

    folder = tmp_path / "tiny"
    model, tok = load_model("tiny", seed=1)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    run = build_run(_compose("model=hf", f"model.name_or_path={folder}", "generation.backend=vllm",
                             "loss.is_clip=2.0", *overrides))
    backend = next(c for c in run.callbacks if type(c).__name__ == "OnPolicyGeneration").backend
    assert backend.dtype == engine_dtype and backend.model_path == str(folder)


def test_strategy_kind_and_deepspeed_by_name():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

    assert D.strategy_kind(None) == "single"
    assert D.strategy_kind(SingleDeviceStrategy(torch.device("cpu"))) == "single"
    assert D.strategy_kind(DDPStrategy()) == "ddp"
    assert D.strategy_kind(FSDPStrategy()) == "fsdp" and D.shards_parameters(FSDPStrategy())

    class DeepSpeedStrategy:  # stands in for Lightning's class (matched by name; deepspeed need not be installed)
        def __init__(self, stage):
            self.config = {"zero_optimization": {"stage": stage}}

    assert D.zero_stage(DeepSpeedStrategy(3)) == 3 and D.shards_parameters(DeepSpeedStrategy(3))
    assert not D.shards_parameters(DeepSpeedStrategy(2)) and D.engine_owns_gradients(DeepSpeedStrategy(2))
    assert not D.engine_owns_gradients(DDPStrategy())


def test_fsdp_wrap_policy_and_errors():
    model, _ = load_model("tiny", seed=0)
    names = {c.__name__ for c in D.fsdp_wrap_policy(model, extra=["LlamaMLP"])}
    assert names == {"LlamaDecoderLayer", "LlamaForCausalLM", "LlamaMLP"}
    with pytest.raises(ValueError, match="trainer.fsdp_wrap: no module of class 'Nope'"):
        D.fsdp_wrap_policy(model, extra=["Nope"])
    with pytest.raises(ValueError, match="decoder-layer class"):
        D.decoder_layer_classes(torch.nn.Linear(2, 2))


def test_single_process_fallbacks():
    assert D.all_ranks(None, True) and not D.all_ranks(None, False)
    assert D.global_sum(None, 3.5) == 3.5
    net = torch.nn.Linear(2, 2)
    with D.gathered_for_generation(None, net) as out:
        assert out is net
    with D.gathered_for_generation(SimpleNamespace(strategy=SimpleNamespace()), net) as out:  # unknown strategy
        assert out is net


def test_ema_update_on_local_shards():
    t = [torch.zeros(3), torch.zeros(0)]
    s = [torch.ones(3), torch.zeros(0)]
    D.ema_update_(t, s, 0.25)
    assert torch.equal(t[0], torch.full((3,), 0.25))
    # ZeRO-3: the update applies to each rank's partition (`ds_tensor`), not to the empty placeholder
    tp, sp = torch.nn.Parameter(torch.empty(0)), torch.nn.Parameter(torch.empty(0))
    tp.ds_tensor, sp.ds_tensor = torch.zeros(4), torch.full((4,), 2.0)
    D.ema_update_([tp], [sp], 0.5)
    assert torch.equal(tp.ds_tensor, torch.ones(4))
    with pytest.raises(RuntimeError, match="sharded differently"):
        D.ema_update_([torch.zeros(3)], [torch.zeros(2)], 0.5)
    with pytest.raises(RuntimeError, match="must be a copy of the student"):
        D.ema_update_([torch.zeros(3)], [], 0.5)


# ------------------------------------------------------------------------------------------------ vLLM pieces


def test_vllm_weight_names():
    from lightning_sd.rollout_backends import vllm_weight_name

    assert vllm_weight_name("model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert vllm_weight_name("base_model.model.model.layers.3.self_attn.q_proj.base_layer.weight") == \
        "model.layers.3.self_attn.q_proj.weight"
    assert vllm_weight_name("base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight") is None
    assert vllm_weight_name("_fsdp_wrapped_module.model.layers.1._fsdp_wrapped_module.mlp.down_proj.weight") == \
        "model.layers.1.mlp.down_proj.weight"
    assert vllm_weight_name("module._orig_mod.lm_head.weight") == "lm_head.weight"
    assert vllm_weight_name("model.layers.0._checkpoint_wrapped_module.input_layernorm.weight") == \
        "model.layers.0.input_layernorm.weight"


def test_student_weights_merge_lora_and_match_checkpoint_names():
    pytest.importorskip("peft")
    from lightning_sd.lora import adapter_parameters, apply_lora
    from lightning_sd.rollout_backends import student_weights

    base, _ = load_model("tiny", seed=0)
    names = [n for n, _ in base.named_parameters()]
    torch.manual_seed(0)
    student = apply_lora(base, {"r": 4, "alpha": 8, "target_modules": ["q_proj", "down_proj"]})
    with torch.no_grad():
        for _, p in adapter_parameters(student, "default"):
            p.normal_(0, 0.1)
    weights = dict(student_weights(student))
    assert list(weights) == names  # base checkpoint names; the tied lm_head is not repeated
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = student(input_ids=ids).logits
    merged, _ = load_model("tiny", seed=0)
    merged.load_state_dict(weights, strict=False)
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (student.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
            - weights["model.layers.0.self_attn.q_proj.weight"]).abs().max() > 1e-4  # the delta is in there


class _Logprob:
    def __init__(self, logprob):
        self.logprob = logprob


def _completion(ids, lps):
    return SimpleNamespace(token_ids=ids, logprobs=[{t: _Logprob(lp), 999: _Logprob(-9.0)} for t, lp in zip(ids, lps)])


def test_sampled_logprobs_from_fake_vllm_output():
    from lightning_sd.rollout_backends import sampled_logprobs

    c = _completion([4, 5, 6], [-0.1, -0.2, -0.3])
    assert sampled_logprobs(c.token_ids, c.logprobs) == pytest.approx([-0.1, -0.2, -0.3])
    assert sampled_logprobs([1, 2], [{1: -0.5}, {2: -1.5}]) == [-0.5, -1.5]  # plain floats too
    with pytest.raises(ValueError, match="logprobs=0"):
        sampled_logprobs([1], None)
    with pytest.raises(ValueError, match="do not contain the sampled token 7"):
        sampled_logprobs([7], [{1: -0.5}])


def test_rollout_from_outputs_matches_sampler_conventions():
    from lightning_sd.rollout_backends import rollout_from_outputs

    eos, pad = 9, 0
    outputs = [SimpleNamespace(outputs=[_completion([4, 5, eos], [-0.1, -0.2, -0.3]), _completion([6], [-0.4])]),
               SimpleNamespace(outputs=[_completion([7, 7, 7, 7], [-1.0] * 4), _completion([eos], [-0.5])])]
    prompt_ids = torch.tensor([[0, 1, 2], [3, 4, 5]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    r = rollout_from_outputs(outputs, prompt_ids, prompt_mask, 2, pad_token_id=pad, stop_token_ids=[eos])
    assert r.completion_ids.tolist() == [[4, 5, eos, 0], [6, 0, 0, 0], [7, 7, 7, 7], [eos, 0, 0, 0]]
    assert r.completion_mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert r.truncated.tolist() == [False, True, True, False]
    torch.testing.assert_close(r.logprobs[0], torch.tensor([-0.1, -0.2, -0.3, 0.0]))
    assert r.prompt_index.tolist() == [0, 0, 1, 1]
    assert torch.equal(r.prompt_ids, prompt_ids.repeat_interleave(2, dim=0))
    with pytest.raises(ValueError, match="expected n=3"):
        rollout_from_outputs(outputs, prompt_ids, prompt_mask, 3, pad_token_id=pad, stop_token_ids=[eos])


def test_sampling_params_are_explicit():
    from lightning_sd.rollout_backends.vllm import sampling_params_kwargs
    from lightning_sd.sampling import SamplingConfig

    kw = sampling_params_kwargs(SamplingConfig(n=2, max_new_tokens=16, temperature=1.1, top_p=0.95, top_k=20), 7, [9])
    assert kw["n"] == 2 and kw["max_tokens"] == 16 and kw["temperature"] == 1.1 and kw["top_p"] == 0.95
    assert kw["top_k"] == 20 and kw["logprobs"] == 0 and kw["stop_token_ids"] == [9] and kw["seed"] == 7
    greedy = sampling_params_kwargs(SamplingConfig(do_sample=False, top_k=0, fixed_length=True), 1, [9])
    assert greedy["temperature"] == 0.0 and greedy["top_k"] == -1 and greedy["ignore_eos"] and greedy["stop_token_ids"] == []


def test_vllm_backend_missing_vllm_is_a_clear_error():
    from lightning_sd.rollout_backends import VllmBackend, VllmError

    with pytest.raises(VllmError, match="model.name_or_path"):
        VllmBackend(None, tokenizer=None)
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed")
    with pytest.raises(ImportError, match="generation.backend=hf"):
        VllmBackend("/some/folder", tokenizer=None).engine()


def test_step_watch_sees_each_optimizer_step_once_and_resumes():
    watch = D.StepWatch()
    at = lambda step: SimpleNamespace(global_step=step)  # noqa: E731
    assert [watch.moved(at(s)) for s in (1, 1, 2, 2)] == [True, False, True, False]  # 2 micro-batches a step
    resumed = D.StepWatch()
    resumed.load(watch.state())
    assert watch.state() == {"last_step": 2}
    assert [resumed.moved(at(s)) for s in (2, 3)] == [False, True]
    fresh = D.StepWatch()
    fresh.load({})
    assert fresh.last_step == -1


def test_step_watch_agrees_with_lightnings_accumulation():
    """In `on_train_batch_end`, `StepWatch.moved` is True exactly where `ends_optimizer_step` is, including the
    shorter accumulation window at the end of an epoch, except at the very first micro-batch: the watch also sees
    step 0 (the weights before any update) there."""
    from lightning.pytorch import Callback, Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    class Probe(Callback):
        def __init__(self):
            self.watch, self.seen = D.StepWatch(), []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seen.append((self.watch.moved(trainer), D.ends_optimizer_step(trainer)))

    model, probe = BoringModel(), Probe()
    model.train_dataloader = lambda: torch.utils.data.DataLoader(torch.randn(5, 32), batch_size=1)
    Trainer(max_epochs=2, accumulate_grad_batches=2, callbacks=[probe], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0).fit(model)
    assert probe.seen[0] == (True, False)
    assert [moved for moved, _ in probe.seen[1:]] == [ends for _, ends in probe.seen[1:]]
    assert [ends for _, ends in probe.seen] == [False, True, False, True, True] * 2
