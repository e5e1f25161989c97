"""Objects from a validated config: model, data module, module, callbacks, trainer. Every driver (`train.py`,
the experiments' runner) starts a run with `prepare_run(cfg, run_dir)` and trains it with the Trainer of
`run.trainer(...)`; tests call `build_run` for every option of every group."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from omegaconf import DictConfig

from lightning_sd.config import sampling_config, validate_config
from lightning_sd.callbacks.generation import OnPolicyGeneration
from lightning_sd.models import enable_activation_checkpointing, load_model, require_chat_template
from lightning_sd.sampling import SamplingConfig


@dataclass
class Run:
    module: Any
    datamodule: Any
    trainer_kwargs: dict
    callbacks: list
    typed: dict
    run_dir: str | None = None

    def trainer(self, *, logger: Any = None, callbacks: list | tuple = (), **overrides: Any):
        """The run's Lightning `Trainer`: its settings (`trainer_kwargs`, `overrides` win), its callbacks then
        `callbacks`, `logger`, and the run folder as its root."""
        from lightning.pytorch import Trainer

        return Trainer(**{**self.trainer_kwargs, **overrides}, callbacks=[*self.callbacks, *callbacks], logger=logger,
                       default_root_dir=self.run_dir)


def build_sampling(g) -> SamplingConfig:
    return sampling_config(g)


def build_teacher_policy(t, student, student_tokenizer):
    from lightning_sd.teachers import build_teacher, check_same_vocabulary

    external = None
    if t.kind == "external":
        external, ext_tok = load_model(**t.model)
        check_same_vocabulary(student_tokenizer, ext_tok, student, external,
                              where="teacher.model (" + ", ".join(f"{k}={t.model.get(k)!r}" for k in
                                                                  ("name", "name_or_path", "tokenizer")) + ")")
    return build_teacher(t.kind, student, rate=t.rate, mix=t.mix, external_model=external)


def hf_records(d) -> tuple[list[dict], list[dict]] | None:
    """`data=hf`: the (train, eval) records of `data.path`, loaded with `datasets`; None for other data."""
    if d.path is None:
        return None
    from lightning_sd.data.hf import load_hf_records

    return load_hf_records(d.path, d.split or "train", d.eval_split, d.name, d.num_proc, d.fields, d.format)


def build_verifier_for(d, task):
    """What checks completions: `data.verifier` when set (`none`: nothing), else the task's own verifier."""
    if d.verifier is None:
        return task
    from lightning_sd.data.verifiers import build_verifier

    return build_verifier(d.verifier, d.verifier_pattern)


def probes_split(d) -> str:
    """The part of every probe (`data.probes`) a run evaluates: "val" when the run's own evaluation is a
    validation split (`data.eval_split=val` for a task, a non-test split of a Hugging Face dataset), else "eval",
    the probes' test part."""
    if d.task is not None:
        return d.eval_split
    validation = d.path is not None and d.eval_split is not None and "test" not in d.eval_split.lower()
    return "val" if validation else "eval"


def build_datamodule(d, tokenizer, max_steps: int | None = None,
                     records: tuple[list[dict], list[dict]] | None = None):
    from lightning_sd.data.datamodule import PromptDataModule
    from lightning_sd.data.sequence import SEQUENCE_TASK, SequentialTasksDataModule, check_sequence

    if d.task == SEQUENCE_TASK:  # continual training over a sequence of tasks (data/continual_*.yaml)
        kw = dict(d.task_kwargs or {})
        steps = check_sequence(kw, max_steps, d.probes) if max_steps is not None else int(kw.get("steps_per_task") or 0)
        return SequentialTasksDataModule(
            tokenizer, tasks=list(kw["tasks"]), probes=list(d.probes), steps_per_task=steps,
            batch_size=d.batch_size, eval_batch_size=d.eval_batch_size, n_train=d.n_train, n_eval=d.n_eval,
            max_prompt_length=d.max_prompt_length, truncation=d.truncation, seed=d.seed, system_prompt=d.system_prompt,
            eval_split=d.eval_split)
    if records is not None or d.path is not None:  # data=hf
        train, evals = records if records is not None else hf_records(d)
        return PromptDataModule(
            tokenizer=tokenizer, records=train, eval_records=evals or None, n_train=d.n_train, n_eval=d.n_eval,
            batch_size=d.batch_size, eval_batch_size=d.eval_batch_size, max_prompt_length=d.max_prompt_length,
            truncation=d.truncation, seed=d.seed, system_prompt=d.system_prompt, probes=list(d.probes),
            eval_split=probes_split(d))
    return PromptDataModule(
        tokenizer=tokenizer, task=d.task, task_kwargs=dict(d.task_kwargs or {}), train_file=d.train_file,
        eval_file=d.eval_file, n_train=d.n_train, n_eval=d.n_eval, batch_size=d.batch_size,
        eval_batch_size=d.eval_batch_size, max_prompt_length=d.max_prompt_length, truncation=d.truncation,
        seed=d.seed, system_prompt=d.system_prompt, eval_split=probes_split(d),
        probes=list(d.probes))


def build_strategy(tr, student, micro_batch_size: int | None = None):
    """A Lightning strategy object (or name) for `trainer.strategy`:

    - `auto`, or any other Lightning strategy name: passed through;
    - `ddp`: `DDPStrategy` (gradients all-reduced; every rank holds the full model);
    - `fsdp`: `FSDPStrategy` wrapping each decoder layer and the whole causal LM (`distributed.fsdp_wrap_policy`;
      tied embeddings stay in one unit), `use_orig_params=True` (frozen and trainable weights may share a unit,
      per-parameter gradients can be rescaled, EMA updates shard-local), `trainer.sharding_strategy`,
      `trainer.offload` (CPU offload);
    - `deepspeed_zero2` / `deepspeed_zero3`: `DeepSpeedStrategy(stage=2|3)`, `trainer.offload` moves optimizer
      state (and ZeRO-3 weights) to CPU; `micro_batch_size` is only for DeepSpeed's throughput logging. Needs
      `pip install deepspeed`: without it Lightning's strategy name is returned and the Trainer says so.
    """
    name = tr.strategy
    if not isinstance(name, str) or name not in ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"):
        return name
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=False)
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        from lightning_sd.distributed import fsdp_wrap_policy

        return FSDPStrategy(auto_wrap_policy=fsdp_wrap_policy(student, tr.fsdp_wrap or ()), use_orig_params=True,
                            sharding_strategy=tr.sharding_strategy or "FULL_SHARD", cpu_offload=bool(tr.offload),
                            limit_all_gathers=True)
    import importlib.util

    stage = 2 if name == "deepspeed_zero2" else 3
    if importlib.util.find_spec("deepspeed") is None:
        # Lightning's registered name: the config still builds anywhere, and creating the Trainer stops with
        # Lightning's "install DeepSpeed (pip install -U deepspeed)" error
        return f"deepspeed_stage_{stage}" + ("_offload" if tr.offload else "")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(stage=stage, offload_optimizer=bool(tr.offload),
                             offload_parameters=bool(tr.offload) and stage == 3,
                             logging_batch_size_per_gpu=micro_batch_size or "auto")


def build_profiler(name: str | None, run_dir: str | None):
    """`trainer.profiler`: Lightning's profiler of that name writing its report to `<run_dir>/fit-profile.txt` (to the
    console without a run folder); None: no profiler. Its table has the step's own spans (`[step]teacher_prompts`,
    `[step]teacher_forward`, `[step]student_forward`, `[step]loss`) next to Lightning's hooks."""
    if name is None:
        return None
    from lightning.pytorch.profilers import AdvancedProfiler, PyTorchProfiler, SimpleProfiler

    kind = {"simple": SimpleProfiler, "advanced": AdvancedProfiler, "pytorch": PyTorchProfiler}[name]
    return kind(dirpath=run_dir, filename="profile" if run_dir else None)


def build_rollout_backend(g, m, d, tokenizer):
    """None for `generation.backend=hf` (the built-in sampler); a `VllmBackend` for `vllm`."""
    if g.backend == "hf":
        return None
    from lightning_sd.rollout_backends import VllmBackend

    path = m.name_or_path
    if m.name == "smollm2_135m":
        from lightning_sd.models import smollm2_folder

        path = str(smollm2_folder(m.cache_dir))
    # the engine samples in generation.dtype when set, else in the student's dtype
    return VllmBackend(path, tokenizer, dtype=g.dtype or m.dtype, max_prompt_length=d.max_prompt_length)


def build_run(cfg: DictConfig, run_dir: str | None = None) -> Run:
    """Validate `cfg` and build everything `train.py` needs (the model is loaded here)."""
    from lightning_sd.module import SelfDistillationModule

    typed = validate_config(cfg)
    check_data_files(typed)  # before the model is loaded
    m, d, t = typed["model"], typed["data"], typed["teacher"]
    if typed["trainer"].retain_heap:
        from lightning_sd.heap import retain_freed_memory

        retain_freed_memory()
    records = hf_records(d)  # data=hf: a missing column or split stops the run before the model is loaded
    model_kwargs = {k: v for k, v in asdict(m).items() if k not in ("gradient_checkpointing", "lora")}
    student, tokenizer = load_model(**model_kwargs)
    require_chat_template(tokenizer, m.chat_template)  # before anything is formatted with it
    tr = typed["trainer"]
    if tr.accelerator == "cpu":  # bf16 on a CPU that emulates it: slower than fp32, said once
        from lightning_sd.cpu_precision import bf16_settings, warn_if_bf16_is_emulated

        warn_if_bf16_is_emulated(bf16_settings(tr.precision, typed["generation"].dtype, m.dtype))
    if m.gradient_checkpointing or tr.gradient_checkpointing:
        enable_activation_checkpointing(student)
    if m.lora:
        from lightning_sd.lora import apply_lora

        student = apply_lora(student, m.lora)
    datamodule = build_datamodule(d, tokenizer, max_steps=tr.max_steps, records=records)
    teacher = build_teacher_policy(t, student, tokenizer)
    e = typed["eval"]
    module = SelfDistillationModule(
        student, tokenizer, teacher=teacher, loss=typed["loss"], task=build_verifier_for(d, datamodule.task),
        optimizer=typed["optimizer"], scheduler=typed["scheduler"],
        max_prompt_length=d.max_prompt_length, truncation=d.truncation, system_prompt=d.system_prompt,
        eval_sampling=SamplingConfig(do_sample=False, max_new_tokens=e.max_new_tokens), run_dir=run_dir)
    backend = build_rollout_backend(typed["generation"], m, d, tokenizer)
    from lightning_sd.callbacks import build_callbacks

    first, last, plugins = build_callbacks(typed["callbacks"], typed["logger"].log_samples_every,
                                           tr.enable_progress_bar)
    if isinstance(tr.strategy, str) and tr.strategy.startswith("deepspeed"):
        plugins = []  # DeepSpeed writes its own checkpoint folders and does not use a CheckpointIO
    callbacks = first + [OnPolicyGeneration(build_sampling(typed["generation"]), backend=backend,
                                            gather_weights=tr.gather_for_generation)]
    from lightning_sd.data.sequence import SequentialTasksDataModule

    if isinstance(datamodule, SequentialTasksDataModule):  # accuracy matrix at every task boundary
        from lightning_sd.callbacks.continual import ContinualEvaluation

        callbacks.append(ContinualEvaluation(datamodule, run_dir=run_dir))
    if tr.enable_checkpointing and run_dir:
        from lightning_sd.callbacks.run_checkpoint import RunCheckpoint

        # last.ckpt (rewritten atomically; the one it replaces kept as previous.ckpt), in this run folder
        callbacks.append(RunCheckpoint(os.path.join(run_dir, "checkpoints"),
                                       every_n_train_steps=tr.checkpoint_every_n_steps or tr.max_steps))
    callbacks += last
    trainer_kwargs = dict(
        accelerator=tr.accelerator, devices=tr.devices, num_nodes=tr.num_nodes, strategy=build_strategy(tr, student, d.batch_size),
        precision=tr.precision, max_steps=tr.max_steps, accumulate_grad_batches=tr.accumulate_grad_batches,
        gradient_clip_val=tr.gradient_clip_val, log_every_n_steps=tr.log_every_n_steps,
        enable_checkpointing=tr.enable_checkpointing, enable_progress_bar=tr.enable_progress_bar,
        deterministic=tr.deterministic, num_sanity_val_steps=0,
        limit_val_batches=0 if tr.val_check_interval is None else None,
        val_check_interval=tr.val_check_interval, plugins=plugins, profiler=build_profiler(tr.profiler, run_dir),
    )
    return Run(module=module, datamodule=datamodule, trainer_kwargs=trainer_kwargs, callbacks=callbacks, typed=typed,
               run_dir=run_dir)


def prepare_run(cfg: DictConfig, run_dir: str, *, verbose_seed: bool = True) -> Run:
    """The start every driver shares: seed everything (`cfg.seed`, data-loader workers included), validate and
    build (`build_run`), set the data up and check it (`check_data`). Raises `ConfigError` / `DataError` /
    `ModelLoadError` before anything trains."""
    from lightning.pytorch import seed_everything

    seed_everything(int(cfg.seed), workers=True, verbose=verbose_seed)
    run = build_run(cfg, run_dir=run_dir)
    run.datamodule.setup("fit")
    check_data(run)
    return run


def build_logger(cfg_logger, run_dir: str, resume: bool = False):
    """`logger=csv`: `<run_dir>/metrics.csv` (on a resume the previous file is kept as `metrics.<k>.csv`, since
    Lightning's CSV logger would delete it). `logger=wandb`: a W&B run whose id is kept in
    `<run_dir>/wandb_run_id`, so that resuming the run folder continues the same W&B run."""
    from lightning.pytorch.utilities import rank_zero_only

    if cfg_logger.name is None:
        return False
    rank_zero = rank_zero_only.rank == 0  # under DDP every rank runs train.py; only rank 0 writes the run's files
    if cfg_logger.name == "csv":
        from lightning_sd.logging_utils import RunFolderCSVLogger
        previous = os.path.join(run_dir, "metrics.csv")
        if resume and rank_zero and os.path.isfile(previous):
            k = 1
            while os.path.exists(os.path.join(run_dir, f"metrics.{k}.csv")):
                k += 1
            os.replace(previous, os.path.join(run_dir, f"metrics.{k}.csv"))
        return RunFolderCSVLogger(save_dir=run_dir, name="", version="")
    from lightning.pytorch.loggers import WandbLogger

    from lightning_sd.logging_utils import wandb_run_id

    if cfg_logger.mode:
        os.environ.setdefault("WANDB_MODE", cfg_logger.mode)
    return WandbLogger(project=cfg_logger.project or "lightning_sd", entity=cfg_logger.entity, save_dir=run_dir,
                       id=wandb_run_id(run_dir, create=rank_zero), resume="allow")


def check_data_files(typed: dict) -> None:
    """Start-up checks before any model is loaded: `data.train_file` and `data.eval_file` exist, parse as JSONL
    records, and (the rows used) have the fields the teacher's template shows. `check_data` repeats the last
    check on the loaded records, tasks' included."""
    from lightning_sd.data.records import DataError, load_jsonl

    d, loss, e = typed["data"], typed["loss"], typed["eval"]
    for key, path, n, shown in (("train_file", d.train_file, d.n_train, True),
                                ("eval_file", d.eval_file, d.n_eval, e.teacher)):
        if path is None:
            continue
        if not os.path.isfile(path):
            raise DataError(f"data.{key}={path!r}: no such file (relative paths start from the folder train.py "
                            f"runs in: {os.getcwd()}); give the path of a JSONL file")
        records = load_jsonl(path)
        if shown and loss.needs_teacher:
            check_context_fields(records[:n] if n is not None else records, loss.options.template, path)


def check_data(run: Run, source: str | None = None) -> None:
    """Start-up checks after `datamodule.setup()`, before any training: every record has the fields the
    teacher's context template shows (non-empty), and the answer a verifier checks against."""
    d, loss, e = run.typed["data"], run.typed["loss"], run.typed["eval"]
    dm = run.datamodule
    from lightning_sd.data.verifiers import check_answers

    check_answers(getattr(dm, "train_records", []), run.module.task, source or d.train_file or d.path or "train")
    if getattr(dm, "eval_records", None):
        check_answers(dm.eval_records, run.module.task, d.eval_file or f"{d.path or 'eval'} (eval)")
    if not getattr(run.module, "needs_teacher", True):  # sft, grpo: no teacher context is built
        return
    check_context_fields(getattr(dm, "train_records", []), loss.options.template,
                         source or d.train_file or d.path or d.task or "train")
    if e.teacher and getattr(dm, "eval_records", None):
        check_context_fields(dm.eval_records, loss.options.template, d.eval_file or f"{d.task or 'eval'} (eval)")


def warn_if_no_chat_template(tokenizer) -> bool:
    """Warn (naming the tokenizer) when it has no chat template; returns whether it has one."""
    import warnings

    from lightning_sd.data.prompts import has_chat_template

    if has_chat_template(tokenizer):
        return True
    warnings.warn(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template: student and teacher "
                  "prompts are plain text ('<prompt>\\n'), formatted the same way on both sides. Fine for base "
                  "models; for an instruct model, set model.tokenizer to a tokenizer with its chat template",
                  stacklevel=2)
    return False


def check_context_fields(records: list[dict], template: str, source: str) -> None:
    """Raise `DataError` when a record lacks a field the teacher's template formats, or has it empty; the
    message names the file and line (JSONL) or the row and the record id, the field and what to do."""
    from string import Formatter

    from lightning_sd.contexts import TEMPLATES
    from lightning_sd.data.records import DataError

    text = TEMPLATES.get(template, template if "{" in template else None)
    if text is None:  # a builder (sdpo): rows without a sibling solution or feedback are masked, by design
        return
    names = sorted({name.split(".")[0].split("[")[0] for _, name, _, _ in Formatter().parse(text) if name})
    bad = [(i, name) for i, rec in enumerate(records) for name in names
           if rec.get(name) is None or (isinstance(rec.get(name), str) and not rec[name].strip())]
    if not bad:
        return
    i, name = bad[0]
    rec = records[i]
    where = f"{source}:{i + 1}" if str(source).endswith((".jsonl", ".json")) else f"{source} row {i}"
    state = "missing" if name not in rec else "empty"
    raise DataError(f"{where} (id {rec.get('id')!r}): field {name!r} is {state}, but loss.template={template!r} shows "
                    f"it to the teacher; fill it in or drop the record, or pick a loss.template that does not use it "
                    f"({len(bad)} record field(s) of {len(records)} records are missing or empty)")
