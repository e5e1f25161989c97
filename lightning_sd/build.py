"""Objects from a validated config: model, data module, module, callbacks, trainer. `train.py` calls
`build_run(cfg)`; tests call it for every option of every group."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from omegaconf import DictConfig

from lightning_sd.config import validate_config
from lightning_sd.generation import OnPolicyGeneration
from lightning_sd.models import load_model
from lightning_sd.sampling import SamplingConfig


@dataclass
class Run:
    module: Any
    datamodule: Any
    trainer_kwargs: dict
    callbacks: list
    typed: dict


def build_sampling(g) -> SamplingConfig:
    return SamplingConfig(n=g.n, max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                          top_k=g.top_k, do_sample=g.do_sample, stop_token_ids=g.stop_token_ids,
                          fixed_length=g.fixed_length, seed=g.seed)


def build_teacher_policy(t, student, student_tokenizer):
    from lightning_sd.teachers import build_teacher, check_same_vocabulary

    external = None
    if t.kind == "external":
        external, ext_tok = load_model(**t.model)
        check_same_vocabulary(student_tokenizer, ext_tok, student, external,
                              where=f"teacher.model.name_or_path={t.model.get('name_or_path')!r}")
    return build_teacher(t.kind, student, rate=t.rate, mix=t.mix, external_model=external)


def build_datamodule(d, tokenizer):
    from lightning_sd.data.datamodule import PromptDataModule

    return PromptDataModule(
        tokenizer=tokenizer, task=d.task, task_kwargs=dict(d.task_kwargs or {}), train_file=d.train_file,
        eval_file=d.eval_file, n_train=d.n_train, n_eval=d.n_eval, batch_size=d.batch_size,
        eval_batch_size=d.eval_batch_size, max_prompt_length=d.max_prompt_length, truncation=d.truncation,
        seed=d.seed, system_prompt=d.system_prompt)


def build_run(cfg: DictConfig, run_dir: str | None = None) -> Run:
    """Validate `cfg` and build everything `train.py` needs (the model is loaded here)."""
    from lightning_sd.module import SelfDistillationModule

    typed = validate_config(cfg)
    m, d, t = typed["model"], typed["data"], typed["teacher"]
    model_kwargs = {k: v for k, v in asdict(m).items() if k not in ("gradient_checkpointing", "lora")}
    student, tokenizer = load_model(**model_kwargs)
    if m.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    datamodule = build_datamodule(d, tokenizer)
    teacher = build_teacher_policy(t, student, tokenizer)
    e = typed["eval"]
    module = SelfDistillationModule(
        student, tokenizer, teacher=teacher, loss=typed["loss"], task=datamodule.task,
        optimizer=asdict(typed["optimizer"]), scheduler=asdict(typed["scheduler"]),
        max_prompt_length=d.max_prompt_length, truncation=d.truncation, system_prompt=d.system_prompt,
        eval_sampling=SamplingConfig(do_sample=False, max_new_tokens=e.max_new_tokens), run_dir=run_dir)
    callbacks = [OnPolicyGeneration(build_sampling(typed["generation"]))]
    tr = typed["trainer"]
    if tr.enable_checkpointing and run_dir:
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=os.path.join(run_dir, "checkpoints"), save_last=True,
                                         every_n_train_steps=tr.checkpoint_every_n_steps or tr.max_steps,
                                         save_top_k=0 if tr.checkpoint_every_n_steps is None else -1))
    trainer_kwargs = dict(
        accelerator=tr.accelerator, devices=tr.devices, num_nodes=tr.num_nodes, strategy=tr.strategy,
        precision=tr.precision, max_steps=tr.max_steps, accumulate_grad_batches=tr.accumulate_grad_batches,
        gradient_clip_val=tr.gradient_clip_val, log_every_n_steps=tr.log_every_n_steps,
        enable_checkpointing=tr.enable_checkpointing, enable_progress_bar=tr.enable_progress_bar,
        deterministic=tr.deterministic, num_sanity_val_steps=0,
        limit_val_batches=0 if tr.val_check_interval is None else None,
        val_check_interval=tr.val_check_interval,
    )
    return Run(module=module, datamodule=datamodule, trainer_kwargs=trainer_kwargs, callbacks=callbacks, typed=typed)


def build_logger(cfg_logger, run_dir: str):
    if cfg_logger.name is None:
        return False
    if cfg_logger.name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=run_dir, name="", version="")
    from lightning.pytorch.loggers import WandbLogger

    if cfg_logger.mode:
        os.environ.setdefault("WANDB_MODE", cfg_logger.mode)
    return WandbLogger(project=cfg_logger.project or "lightning_sd", entity=cfg_logger.entity, save_dir=run_dir)
