"""A trained student (or its EMA teacher) as a Hugging Face folder that `from_pretrained` and vLLM load.

`train.py` writes `<run folder>/model/` at the end of every run (`callbacks.export_model`); any checkpoint of a
run can be exported afterwards:

    python -m lightning_sd.export <run folder>/checkpoints/last.ckpt <folder> [--teacher] [--merge-lora]

The folder holds the weights as safetensors, `config.json`, `generation_config.json` and the tokenizer with its
chat template. A LoRA run writes PEFT's adapter folder (`adapter_config.json`, `adapter_model.safetensors`) and,
with `--merge-lora` / `callbacks.export_merged_lora=true`, the adapter merged into the base weights under
`<folder>/merged/`. A checkpoint is read with the run's own config (`<run folder>/.hydra/config.yaml`, or
`--config`): the base model is loaded as the run loaded it, then the checkpoint's weights replace its own.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from lightning_sd.callbacks.checkpoint_io import CheckpointError, verify_checkpoint
from lightning_sd.lora import TRAIN_ADAPTER, is_peft

STUDENT, TEACHER = "student.", "teacher.model."


def _save_full(model: nn.Module, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    gen = copy.deepcopy(getattr(model, "generation_config", None))
    if gen is not None:  # a model built from a config has no stop token in its generation config
        gen.eos_token_id = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
        gen.pad_token_id = gen.pad_token_id if gen.pad_token_id is not None else tokenizer.pad_token_id
        gen.save_pretrained(folder)


def export_model(model: nn.Module, tokenizer, folder: str | os.PathLike, *, merge_lora: bool = False) -> Path:
    """Write `model` (a transformers causal LM, or a PEFT model whose trained adapter is `default`) and
    `tokenizer` to `folder` (created; files of the same names are replaced). A PEFT model writes its adapter
    folder, and with `merge_lora` also `<folder>/merged/`: the adapter merged into a copy of the base weights
    (the model itself is left as it was). Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if is_peft(model):
        model.save_pretrained(folder, selected_adapters=[TRAIN_ADAPTER], safe_serialization=True)
        tokenizer.save_pretrained(folder)
        if merge_lora:
            merged = copy.deepcopy(model)
            for name in [a for a in merged.peft_config if a != TRAIN_ADAPTER]:  # an EMA teacher's adapter
                merged.delete_adapter(name)
            merged.set_adapter(TRAIN_ADAPTER)
            _save_full(merged.merge_and_unload(), tokenizer, folder / "merged")
    else:
        _save_full(model, tokenizer, folder)
    return folder


def run_config_path(checkpoint: str | os.PathLike) -> Path:
    """The config of the run that wrote `checkpoint` (`<run folder>/checkpoints/x.ckpt` ->
    `<run folder>/.hydra/config.yaml`)."""
    return Path(checkpoint).resolve().parent.parent / ".hydra" / "config.yaml"


def checkpoint_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The module's state dict from a checkpoint file (verified: integrity record, finite values), a DeepSpeed
    checkpoint folder, or a sharded FSDP checkpoint folder (both consolidated in memory)."""
    path = Path(path)
    if path.is_file():
        return verify_checkpoint(path)["state_dict"]
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint file or folder; give a run's checkpoints/last.ckpt")
    if (path / "latest").is_file() or any(path.glob("*/mp_rank_*_model_states.pt")):  # DeepSpeed's layout
        try:
            from lightning.pytorch.utilities.deepspeed import (
                convert_zero_checkpoint_to_fp32_state_dict,
            )
        except ImportError as err:
            raise CheckpointError(f"{path}: a DeepSpeed checkpoint; exporting it needs deepspeed installed "
                                  f"({err})") from None
        with tempfile.TemporaryDirectory() as tmp:  # the consolidated copy is read once, not left next to the run
            out = os.path.join(tmp, "consolidated.ckpt")
            convert_zero_checkpoint_to_fp32_state_dict(str(path), out)
            return torch.load(out, map_location="cpu", weights_only=False)["state_dict"]
    if (path / ".metadata").is_file():  # torch.distributed.checkpoint, as Lightning's FSDP writes it sharded
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        return _load_distributed_checkpoint(path)["state_dict"]
    raise CheckpointError(f"{path}: a folder that is neither a DeepSpeed nor a sharded FSDP checkpoint")


def export_checkpoint(checkpoint: str | os.PathLike, folder: str | os.PathLike, *,
                      config: str | os.PathLike | None = None, teacher: bool = False,
                      merge_lora: bool = False) -> Path:
    """Export the student (`teacher=True`: the EMA/trust-region teacher's copy) held in `checkpoint` to
    `folder`, rebuilding the model from the run's config (`config`, default `run_config_path(checkpoint)`)."""
    from omegaconf import OmegaConf

    from lightning_sd.config import ConfigError, validate_config
    from lightning_sd.lora import apply_lora
    from lightning_sd.models import load_model

    config = Path(config) if config else run_config_path(checkpoint)
    if not config.is_file():
        raise ConfigError(f"{config}: no run config next to the checkpoint; give the run's .hydra/config.yaml "
                          "with --config")
    m = validate_config(OmegaConf.load(config))["model"]
    state = checkpoint_state(checkpoint)
    prefix = TEACHER if teacher else STUDENT
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        what = ("its teacher is not saved in checkpoints (a frozen or external teacher is rebuilt from the base "
                "model; a LoRA run's EMA teacher is an adapter, not a copy): export the student"
                if teacher else "it holds no student weights")
        raise CheckpointError(f"{checkpoint}: {what}")
    model, tokenizer = load_model(**{k: v for k, v in asdict(m).items() if k not in ("gradient_checkpointing", "lora")})
    if m.lora and not teacher:
        model = apply_lora(model, m.lora)
        if any(".ema." in k for k in weights):  # the EMA adapter was added next to the trained one
            from lightning_sd.lora import add_ema_adapter

            add_ema_adapter(model)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k.split("base_model.model.")[-1] not in tied]
    if missing or unexpected:
        raise CheckpointError(f"{checkpoint}: its weights do not fit the model of {config} (missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}); give the run's own config with --config")
    return export_model(model, tokenizer, folder, merge_lora=merge_lora)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lightning_sd.export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a run's checkpoints/last.ckpt (or a DeepSpeed / sharded FSDP folder)")
    p.add_argument("folder", help="the folder to write (from_pretrained loads it)")
    p.add_argument("--config", help="the run's config (default: <run folder>/.hydra/config.yaml)")
    p.add_argument("--teacher", action="store_true", help="export the EMA / trust-region teacher instead")
    p.add_argument("--merge-lora", action="store_true", help="a LoRA run: also write the merged model to merged/")
    args = p.parse_args(argv)
    from lightning_sd.config import ConfigError
    from lightning_sd.models import ModelLoadError

    try:
        out = export_checkpoint(args.checkpoint, args.folder, config=args.config, teacher=args.teacher,
                                merge_lora=args.merge_lora)
    except (CheckpointError, ConfigError, ModelLoadError) as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(f"exported {'teacher' if args.teacher else 'student'} to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
