"""Config schemas, one dataclass per Hydra group, and start-up validation.

Each dataclass holds its group's defaults, the only place they are written: they are registered with Hydra as
`<group>/_base`, which every option of `conf/<group>/` starts from, so every option carries every key (null
where unused) and any key can be overridden or swept on any option. `validate_config(cfg)` merges each group into its schema: an unknown key, a wrong type or an
impossible value stops the run at start-up with a message naming the key (`loss.bta: unknown key ...`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_sd.data.prompts import TRUNCATION, TRUNCATIONS
from lightning_sd.models import DTYPES
from lightning_sd.methods.base import option_defaults
from lightning_sd.objectives import LossConfig, check_renamed_keys
from lightning_sd.optim import OptimizerConfig, SchedulerConfig
from lightning_sd.sampling import SamplingConfig
from lightning_sd.step_in_backward import check_step_in_backward
from lightning_sd.teachers import TEACHERS, teacher_class


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and what to do."""


@dataclass
class ModelConfig:
    name: str = "smollm2_135m"
    name_or_path: str | None = None
    gguf_file: str | None = None
    tokenizer: str | None = None
    dtype: str = "float32"
    cache_dir: str | None = None
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    intermediate_size: int | None = None
    seed: int = 0
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    lora: dict | None = None
    chat_template: str | None = None  # null: the tokenizer's; chatml; plain; a Jinja string or a file holding one


@dataclass
class DataConfig:
    task: str | None = "fictional_facts"
    # empty: an option's dict is merged into this one key by key, so anything here would join every task's options
    task_kwargs: dict = field(default_factory=dict)
    train_file: str | None = None
    eval_file: str | None = None
    n_train: int | None = 96
    n_eval: int | None = 24
    batch_size: int = 8
    eval_batch_size: int | None = 32
    max_prompt_length: int | None = 512
    truncation: str = TRUNCATION  # left (a long prompt loses its beginning) | error
    system_prompt: str | None = None
    seed: int = 0
    eval_split: str | None = "eval"  # tasks: "eval" (held-out test) or "val"; data=hf: a split name, or null
    verifier: Any = None  # null: the task's own (none for files); a name of data/verifiers.py; or {_target_: ...}
    verifier_pattern: str | None = None  # verifier=regex: the pattern
    path: str | None = None  # data=hf: a local folder or data file, or a Hub dataset id
    name: str | None = None  # data=hf: the dataset's configuration name
    split: str | None = None  # data=hf: the train split
    num_proc: int | None = None  # data=hf: processes for loading and mapping
    fields: dict | None = None  # data=hf: {prompt, solution, answer, system, id} -> column names
    format: dict | None = None  # data=hf: {_target_: a function row -> record}, for rows a mapping cannot express
    # task specs only evaluated, never trained (retention; task_spec.py): by default the known-facts probe
    probes: list = field(default_factory=lambda: [{"task": "known_facts", "task_kwargs": {}, "n_train": None,
                                                   "n_eval": None, "label": "known_facts"}])


@dataclass
class TeacherConfig:
    kind: str = "frozen"
    rate: float | None = None
    mix: float | None = None
    model: dict | None = None


@dataclass
class GenerationConfig(SamplingConfig):
    """The `generation` group: every setting of the sampler (`SamplingConfig`, its fields and defaults) and the
    engine that samples."""

    backend: str = "hf"


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: Any = "auto"
    precision: str = "32-true"
    max_steps: int = 40
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = 1.0
    log_every_n_steps: int = 1
    val_check_interval: int | None = None
    enable_checkpointing: bool = True
    checkpoint_every_n_steps: int | None = 10  # last.ckpt rewritten (atomically) every N steps; null: at the end only
    enable_progress_bar: bool = True
    deterministic: bool = False
    gradient_checkpointing: bool = False  # recompute activations in backward (non-reentrant; every strategy)
    gather_for_generation: bool = True  # FSDP / ZeRO-3: gather the weights once per rollout (false: per layer per step)
    sharding_strategy: str | None = None  # fsdp only: FULL_SHARD | SHARD_GRAD_OP | HYBRID_SHARD | NO_SHARD
    fsdp_wrap: list | None = None  # fsdp only: extra module class names to wrap (decoder layers + the LM always are)
    offload: bool = False  # fsdp / deepspeed: optimizer state (ZeRO-3 and FSDP: weights too) kept on CPU
    retain_heap: bool = True  # glibc: freed CPU memory stays in the heap for the next step (RSS does not drop)
    profiler: str | None = None  # simple | advanced | pytorch: Lightning's profiler, report in <run folder>/fit-profile.txt


PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed")
PROFILERS = ("simple", "advanced", "pytorch")
SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD")
LORA_KEYS = ("r", "alpha", "dropout", "target_modules", "bias")


def validate_trainer(tr: TrainerConfig) -> None:
    """Impossible trainer combinations (independent of the hardware at hand, so configs validate anywhere)."""
    if tr.precision not in PRECISIONS + ("32", "16-true", "64-true"):
        raise ConfigError(f"trainer.precision={tr.precision!r} is not one of {', '.join(PRECISIONS)}")
    strategy = tr.strategy if isinstance(tr.strategy, str) else None
    if tr.accelerator == "cpu":
        if tr.precision in ("16-mixed", "16-true"):
            raise ConfigError(f"trainer.precision={tr.precision} needs a GPU (trainer.accelerator=gpu); on CPU use "
                              "32-true or bf16-mixed")
        if strategy in ("fsdp", "deepspeed_zero2", "deepspeed_zero3"):
            raise ConfigError(f"trainer.strategy={strategy} needs trainer.accelerator=gpu (Lightning runs FSDP and "
                              "DeepSpeed on GPUs only); on CPU use trainer=ddp_cpu")
    if tr.profiler is not None and tr.profiler not in PROFILERS:
        raise ConfigError(f"trainer.profiler={tr.profiler!r} is not one of {', '.join(PROFILERS)} (or null: none)")
    if tr.accumulate_grad_batches < 1:
        raise ConfigError(f"trainer.accumulate_grad_batches must be >= 1, got {tr.accumulate_grad_batches}")
    if tr.sharding_strategy is not None:
        if strategy != "fsdp":
            raise ConfigError(f"trainer.sharding_strategy={tr.sharding_strategy} applies to trainer.strategy=fsdp only; "
                              "set it to null")
        if tr.sharding_strategy not in SHARDING_STRATEGIES:
            raise ConfigError(f"trainer.sharding_strategy={tr.sharding_strategy!r} is not one of {SHARDING_STRATEGIES}")
    if tr.fsdp_wrap is not None and strategy != "fsdp":
        raise ConfigError("trainer.fsdp_wrap applies to trainer.strategy=fsdp only; set it to null")
    if tr.offload and strategy not in ("fsdp", "deepspeed_zero2", "deepspeed_zero3"):
        raise ConfigError("trainer.offload=true needs trainer.strategy=fsdp, deepspeed_zero2 or deepspeed_zero3")


@dataclass
class LoggerConfig:
    name: str | None = "csv"
    project: str | None = None
    entity: str | None = None
    mode: str | None = None
    log_samples_every: int | None = None


@dataclass
class EvalConfig:
    """The before/after evaluation: greedy accuracy of the student (and of the teacher with its context); with
    `samples` > 0 also the student's sampled accuracy, `samples` completions per prompt at `temperature`."""

    before: bool = True
    after: bool = True
    teacher: bool = True
    max_new_tokens: int = 48
    samples: int = 0
    temperature: float = 1.0

    def validate(self) -> None:
        if not isinstance(self.samples, int) or self.samples < 0:
            raise ConfigError(f"eval.samples must be an integer >= 0 (0: greedy only), got {self.samples!r}")
        if self.samples and not self.temperature > 0:
            raise ConfigError(f"eval.temperature must be > 0 to sample (eval.samples={self.samples}), "
                              f"got {self.temperature}")


@dataclass
class CallbacksConfig:
    """Reliability and inspection callbacks (`lightning_sd.callbacks`)."""

    atomic_checkpoints: bool = True  # checkpoints written to a temp file in the same folder, fsynced, renamed
    keep_previous_checkpoint: bool = True  # False: only last.ckpt (the fallback a damaged last.ckpt resumes from goes)
    export_model: bool = True  # the student as a Hugging Face folder in <run folder>/model/ at the end of training
    export_merged_lora: bool = False  # a LoRA run: also the adapter merged into the base weights (model/merged/)
    rng_state: bool = True  # Python, NumPy, torch and CUDA random states saved and restored with checkpoints
    token_view_every: int | None = 10  # optimizer steps between per-token HTML views (<run folder>/token_views); null: off
    token_view_rows: int = 4  # completions per view
    token_view_topk: int = 3  # the teacher's top alternatives shown on hover (0: none)
    sample_rows: int = 8  # completions per sample table (every logger.log_samples_every steps)
    progress_bar: str = "rich"  # rich (steps, loss, divergence, reward, tokens/s) | tqdm


MODEL_NAMES = ("smollm2_135m", "tiny", "hf")


def check_external_teacher(model: dict | None) -> None:
    """`teacher=external`: a built-in model name needs nothing more; `hf` needs a folder, hub id or GGUF file."""
    if not model:
        raise ConfigError("teacher=external needs teacher.model (e.g. teacher.model.name=smollm2_135m, or "
                          "teacher.model.name=hf teacher.model.name_or_path=<folder>)")
    name = model.get("name")
    if name not in MODEL_NAMES:
        raise ConfigError(f"teacher.model.name={name!r} is not one of {list(MODEL_NAMES)}")
    if name == "hf" and not model.get("name_or_path") and not model.get("gguf_file"):
        raise ConfigError("teacher=external with teacher.model.name=hf needs teacher.model.name_or_path=<local folder "
                          "or hub id> (or teacher.model.gguf_file=<path of a .gguf file>); a built-in teacher needs "
                          "only teacher.model.name=smollm2_135m or tiny")


def validate_data_sources(d: DataConfig) -> None:
    """The verifier builds (a known name, a valid pattern, an importable function) and the data=hf keys make
    sense; raises `ConfigError` naming the key."""
    from lightning_sd.data.records import DataError
    from lightning_sd.data.verifiers import build_verifier

    try:
        build_verifier(d.verifier, d.verifier_pattern)
    except DataError as err:
        raise ConfigError(str(err)) from None
    if d.path is None:
        return
    from lightning_sd.data.hf import FIELDS

    unknown = sorted(set(d.fields or {}) - set(FIELDS))
    if unknown:
        raise ConfigError(f"data.fields: unknown key(s) {unknown}; valid keys: {list(FIELDS)} (each maps to a column)")
    if not (d.fields or {}).get("prompt") and not d.format:
        raise ConfigError("data=hf needs data.fields.prompt (the prompt column) or data.format (a row formatter)")
    if d.format is not None and "_target_" not in d.format:
        raise ConfigError("data.format must be {_target_: package.module.function}, a function row -> record")
    if d.num_proc is not None and d.num_proc < 1:
        raise ConfigError(f"data.num_proc must be >= 1 or null, got {d.num_proc}")


def validate_callbacks(c: CallbacksConfig) -> None:
    if c.token_view_every is not None and c.token_view_every < 1:
        raise ConfigError(f"callbacks.token_view_every must be >= 1 or null (off), got {c.token_view_every}")
    for key in ("token_view_rows", "sample_rows"):
        if getattr(c, key) < 1:
            raise ConfigError(f"callbacks.{key} must be >= 1, got {getattr(c, key)}")
    if c.token_view_topk < 0:
        raise ConfigError(f"callbacks.token_view_topk must be >= 0 (0 = no alternatives), got {c.token_view_topk}")
    if c.progress_bar not in ("rich", "tqdm"):
        raise ConfigError(f"callbacks.progress_bar={c.progress_bar!r} is not one of rich, tqdm "
                          "(trainer.enable_progress_bar=false turns the bar off)")


GROUP_SCHEMAS = {
    "model": ModelConfig, "data": DataConfig, "loss": LossConfig, "teacher": TeacherConfig,
    "generation": GenerationConfig, "optimizer": OptimizerConfig, "scheduler": SchedulerConfig,
    "trainer": TrainerConfig, "logger": LoggerConfig, "eval": EvalConfig, "callbacks": CallbacksConfig,
}


def register_group_defaults() -> None:
    """Register each group's defaults, read from its schema dataclass, with Hydra's ConfigStore as `<group>/_base`.

    Every option file of `conf/<group>/` lists `_base` first in its defaults and then only the keys it changes,
    so each default is written once, in its dataclass. Runs when `lightning_sd` is imported; a program that
    composes `conf/` with Hydra's compose API imports `lightning_sd` first."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for group in GROUP_SCHEMAS:
        store.store(group=group, name="_base", node=group_defaults(group))


def group_defaults(group: str) -> dict:
    """A group's keys and their defaults, read from its schema dataclass; for `loss`, `LossConfig`'s own keys and
    then every registered method's options (`Method.Options`), which a loss config lists as flat keys."""
    if group == "loss":
        shared = {f.name: f.default for f in fields(LossConfig) if f.name in LossConfig.keys()}
        return {**shared, **option_defaults()}
    return OmegaConf.to_container(OmegaConf.structured(GROUP_SCHEMAS[group]))


def _typed(group: str, node: Any, schema: type) -> Any:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node if node is not None else {})
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
        valid = ", ".join(f.name for f in fields(schema))
        raise ConfigError(f"{group}.{key}: {err.msg if hasattr(err, 'msg') else err}. Valid keys of `{group}`: "
                          f"{valid}") from None
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:  # e.g. a `???` left unset (teacher.model.name_or_path)
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"{group}.{key}: {err.msg if hasattr(err, 'msg') else err}; set it on the command line, "
                          f"e.g. {group}.{key}=...") from None


TRUE_PRECISIONS = {"bf16-true": "bf16", "16-true": "fp16", "64-true": "float64"}  # precisions that cast the model


def check_generation_dtype(g: GenerationConfig, m: ModelConfig, tr: TrainerConfig, loss: LossConfig) -> None:
    """`generation.dtype` (already a known name; with `generation.backend=vllm`, the engine's dtype): the built-in
    sampler needs whole weights on each rank, and `loss.is_clip` must be set when the rollout runs on a copy in
    another dtype than the student trains in."""
    if g.dtype is None:
        return
    if g.backend == "hf" and tr.strategy in ("fsdp", "deepspeed_zero3"):
        raise ConfigError(f"generation.dtype={g.dtype} is not supported with trainer.strategy={tr.strategy} (the "
                          "rollout's copy of the weights needs them whole on each rank); set generation.dtype=null")
    student = TRUE_PRECISIONS.get(tr.precision, m.dtype)
    if DTYPES.get(student) != DTYPES[g.dtype] and loss.is_clip is None and loss.method().samples:
        raise ConfigError(f"generation.dtype={g.dtype} samples from a {g.dtype} copy of a student that trains in "
                          f"{student}, so the trainer's and the sampler's token probabilities differ: set "
                          "loss.is_clip (e.g. 2.0) to apply the importance-weight correction")


def sampling_config(g: GenerationConfig) -> SamplingConfig:
    """The `SamplingConfig` of a `generation` group (its keys minus `backend`)."""
    return SamplingConfig(**{f.name: getattr(g, f.name) for f in fields(SamplingConfig)})


# teacher key -> the kinds that read it
TEACHER_KEYS_READ = {key: tuple(k for k, cls in TEACHERS.items() if cls.option == key) for key in ("rate", "mix", "model")}


def warn_ignored_teacher_keys(t) -> list[str]:
    """Warn about teacher keys that the chosen `teacher.kind` does not read (`teacher.rate` on a frozen
    teacher, say): a value set there changes nothing. Returns the keys warned about."""
    import warnings

    ignored = [key for key, kinds in TEACHER_KEYS_READ.items() if getattr(t, key) is not None and t.kind not in kinds]
    for key in ignored:
        kinds = " or ".join(f"teacher={k}" for k in TEACHER_KEYS_READ[key])
        warnings.warn(f"teacher.{key}={getattr(t, key)!r} is ignored by teacher={t.kind} (only {kinds} reads it); "
                      f"drop it, or choose {kinds}", stacklevel=3)
    return ignored


def check_renamed_overrides(overrides: Iterable[str]) -> None:
    """Command-line overrides of a renamed key (`loss.lam=0.9`, `+loss.lam=0.9`, `~loss.lam`): a `ConfigError`
    naming the new key, where Hydra alone would answer with its generic "not in struct"."""
    for item in overrides:
        group, _, key = item.lstrip("+~").split("=", 1)[0].partition(".")
        if group == "loss":
            check_renamed_keys([key], ConfigError)


def check_objective(metric: Any, d: DataConfig, e: EvalConfig) -> None:
    """`optimized_metric` (what a recipe search's trial returns, e.g. `eval_after.student_accuracy`): a dotted
    key of `metrics.json` whose evaluation runs, on a validation split. A search tuned on the held-out test
    split would report a number chosen on it, so a task's `data.eval_split` must be `val`, and a Hugging Face
    dataset's must name a split other than its test split."""
    if metric is None:
        return
    if not isinstance(metric, str) or not metric:
        raise ConfigError(f"optimized_metric must be a key of metrics.json such as eval_after.student_accuracy, "
                          f"or null, got {metric!r}")
    stage, _, rest = metric.partition(".")
    if stage in ("eval_before", "eval_after") and not getattr(e, stage.split("_")[1]):
        raise ConfigError(f"optimized_metric={metric} needs eval.{stage.split('_')[1]}=true")
    if stage in ("eval_before", "eval_after") and rest.startswith("sampled") and not e.samples:
        raise ConfigError(f"optimized_metric={metric} is the sampled accuracy: set eval.samples (completions per "
                          f"prompt, e.g. eval.samples=2)")
    held_out = (d.task is not None and d.eval_split != "val") or \
        (d.path is not None and (d.eval_split is None or "test" in d.eval_split.lower()))
    if held_out:
        split = "val" if d.task is not None else "<a validation split>"
        raise ConfigError(f"optimized_metric={metric} (set by every hparams_search) scores search trials, and "
                          f"they must be scored on a validation split, not on data.eval_split={d.eval_split} "
                          f"(the held-out test split): set data.eval_split={split}. Measure the chosen recipe "
                          f"on the test split afterwards, in runs without hparams_search and optimized_metric")


def validate_config(cfg: DictConfig) -> dict:
    """Check every group of `cfg`; returns `{group: typed dataclass}`. Raises `ConfigError`."""
    typed = {}
    for group, schema in GROUP_SCHEMAS.items():
        node = cfg.get(group)
        if group != "loss":
            typed[group] = _typed(group, node, schema)
            continue
        try:  # the shared keys and the method's options, each checked against its type, validated once
            typed[group] = LossConfig.from_dict(OmegaConf.to_container(node, resolve=True) if node else None)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    loss: LossConfig = typed["loss"]
    t: TeacherConfig = typed["teacher"]
    try:
        policy = teacher_class(t.kind)
        policy.check_option(getattr(t, policy.option) if policy.option else None)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if policy.option == "model":
        check_external_teacher(t.model)
    if loss.chunk_size and not policy.scores_hidden_states:
        raise ConfigError(f"loss.chunk_size is not supported with teacher={t.kind}; set loss.chunk_size=null")
    warn_ignored_teacher_keys(t)
    g: GenerationConfig = typed["generation"]
    if g.backend not in ("hf", "vllm"):
        raise ConfigError(f"generation.backend={g.backend!r} is not one of 'hf', 'vllm'")
    try:  # the sampler's own rules (n, max_new_tokens, temperature, top_p, top_k), before anything is loaded
        g.validate()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    d: DataConfig = typed["data"]
    sources = [k for k in ("task", "train_file", "path") if getattr(d, k)]
    if len(sources) != 1:
        hint = ("" if sources else "; data=jsonl needs data.train_file=<file.jsonl>, data=hf needs "
                "data.path=<folder | data file | Hub dataset id>")
        raise ConfigError(f"data needs exactly one of data.task, data.train_file or data.path (data=hf) "
                          f"(got {sources or 'none'}){hint}")
    validate_data_sources(d)
    if d.truncation not in TRUNCATIONS:
        raise ConfigError(f"data.truncation={d.truncation!r} must be 'left' or 'error'")
    if d.batch_size < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {d.batch_size}")
    tr: TrainerConfig = typed["trainer"]
    if tr.max_steps < 1:
        raise ConfigError(f"trainer.max_steps must be >= 1, got {tr.max_steps}")
    validate_trainer(tr)
    from lightning_sd.data.sequence import SEQUENCE_TASK, check_sequence
    from lightning_sd.methods.requirements import check_method

    try:
        check_method(loss, t, g, d)
        if d.task == SEQUENCE_TASK:
            check_sequence(dict(d.task_kwargs or {}), tr.max_steps, d.probes)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    m: ModelConfig = typed["model"]
    if m.name == "hf" and not m.name_or_path and not m.gguf_file:
        raise ConfigError("model=hf needs model.name_or_path=<local folder or Hub id> (or model.gguf_file)")
    lora = m.lora
    if lora:
        unknown = sorted(set(lora) - set(LORA_KEYS))
        if unknown:
            raise ConfigError(f"model.lora: unknown key(s) {unknown}; valid keys: {list(LORA_KEYS)}")
        if not isinstance(lora.get("r"), int) or lora["r"] < 1:
            raise ConfigError(f"model.lora.r must be an integer >= 1, got {lora.get('r')!r}")
    if g.backend == "vllm" and loss.is_clip is None and loss.method().samples:
        raise ConfigError("generation.backend=vllm samples with another engine, so the trainer's and the sampler's "
                          "token probabilities differ: set loss.is_clip (e.g. 2.0) to apply the importance-weight "
                          "correction")
    check_generation_dtype(g, typed["model"], tr, loss)
    try:
        typed["optimizer"].validate()
        typed["scheduler"].validate()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if typed["optimizer"].in_backward:
        devices = tr.devices if isinstance(tr.devices, int) else 1
        try:
            check_step_in_backward(gradient_clip_val=tr.gradient_clip_val,
                                   accumulate_grad_batches=tr.accumulate_grad_batches,
                                   processes=devices * tr.num_nodes, precision=tr.precision,
                                   strategy=tr.strategy if isinstance(tr.strategy, str) else None)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if typed["logger"].name not in (None, "csv", "wandb"):
        raise ConfigError(f"logger.name={typed['logger'].name!r} is not one of csv, wandb, null")
    if typed["logger"].log_samples_every is not None and typed["logger"].log_samples_every < 1:
        raise ConfigError(f"logger.log_samples_every must be >= 1 or null (off), "
                          f"got {typed['logger'].log_samples_every}")
    validate_callbacks(typed["callbacks"])
    typed["eval"].validate()
    check_objective(cfg.get("optimized_metric"), d, typed["eval"])
    return typed


register_group_defaults()
