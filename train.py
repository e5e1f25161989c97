"""Train with on-policy self-distillation: `python train.py [group=option ...] [key=value ...]`.

Prints a short header (the full config is in `<run folder>/.hydra/config.yaml`; `verbose=true` prints it),
evaluates the student (and the teacher with its privileged context) before and after training, trains, writes
`metrics.json` into the run folder and prints a summary table.

A recipe search, `python train.py -m hparams_search=<name>` (conf/hparams_search/, Hydra's Optuna sweeper):
each trial is such a run, and returns its `optimized_metric` (a key of `metrics.json`) for the sweeper to
maximize.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import lightning_sd.config  # noqa: F401  registers each group's defaults (conf/<group>/_base) with Hydra

CONF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")


def config_groups() -> str:
    """`--help`'s list of groups and the options a user picks (not `_base`, the defaults every option starts from)."""
    lines = []
    for group in sorted(os.listdir(CONF)):
        folder = os.path.join(CONF, group)
        if os.path.isdir(folder):
            options = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml") and not f.startswith("_"))
            lines.append(f"{group}: {', '.join(options)}")
    return "\n".join(lines)


OmegaConf.register_new_resolver("config_groups", config_groups, replace=True)


def resolve_ckpt_path(ckpt_path: str | None, run_dir: str) -> str | None:
    """`ckpt_path=last`: the newest checkpoint of `<run_dir>/checkpoints` that passes verification, `last.ckpt`
    or else the fallback `previous.ckpt` (a damaged `last.ckpt` is renamed `last.ckpt.corrupt`, loudly); None
    when there is none (a fresh start; so a preemptible job can always pass `ckpt_path=last
    hydra.run.dir=<its folder>`). A path must exist and pass verification. Raises `CheckpointError`."""
    from lightning_sd.callbacks.checkpoint_io import LAST, PREVIOUS, CheckpointError, verify_checkpoint

    if ckpt_path is None:
        return None
    if ckpt_path != "last":
        if not os.path.isfile(ckpt_path):
            raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: no such file; give a checkpoint file, or "
                                    "ckpt_path=last with hydra.run.dir=<the run's folder>")
        verify_checkpoint(ckpt_path)
        return ckpt_path
    folder = os.path.join(run_dir, "checkpoints")
    candidates = [os.path.join(folder, name) for name in (LAST, PREVIOUS) if os.path.isfile(os.path.join(folder, name))]
    if not candidates:
        print(f"[resume] ckpt_path=last: no checkpoint in {folder}; starting from scratch. To resume a run, pass "
              "hydra.run.dir=<that run's folder> with ckpt_path=last", flush=True)
        return None
    failures = []
    for path in candidates:
        try:
            step = verify_checkpoint(path).get("global_step")
        except CheckpointError as err:
            failures.append(err)
            continue
        if failures or os.path.basename(path) != LAST:
            _fall_back(folder, path, step, failures)
        print(f"[resume] continuing from {path} (step {step})", flush=True)
        return path
    raise CheckpointError("ckpt_path=last: no checkpoint in " + folder + " can be resumed:\n  " +
                          "\n  ".join(map(str, failures)) + "\nStart again in a new run folder (or delete " + folder +
                          " to start this one from scratch)")


def _fall_back(folder: str, path: str, step, failures: list) -> None:
    """Say loudly that the fallback checkpoint is used, and move a damaged `last.ckpt` aside so that the next
    save does not keep it as the fallback."""
    import warnings

    from lightning.pytorch.utilities import rank_zero_only

    from lightning_sd.callbacks.checkpoint_io import LAST

    last = os.path.join(folder, LAST)
    why = "; ".join(map(str, failures)) or f"{last} is missing (the job stopped while replacing it)"
    if os.path.isfile(last) and rank_zero_only.rank == 0:
        os.replace(last, last + ".corrupt")
        why += f". It was renamed {LAST}.corrupt (kept for inspection; delete it when done)"
    message = f"FALLING BACK to {path} (step {step}): {why}"
    print(f"[resume] WARNING: {message}", flush=True)
    warnings.warn(message, stacklevel=3)


def earlier_results(run_dir: str) -> dict:
    """What a resumed run carries over from the `metrics.json` of the run folder's earlier part: its
    evaluation before training (`eval_before`), when there was one."""
    path = os.path.join(run_dir, "metrics.json")
    try:
        with open(path) as f:
            earlier = json.load(f)
    except (OSError, ValueError):  # none yet (stopped before its first metrics.json), or unreadable
        return {}
    return {k: earlier[k] for k in ("eval_before",) if k in earlier}


def objective_value(metrics: dict, name: str) -> float:
    """The value of `optimized_metric=name`, a dotted key of `metrics.json` (`eval_after.student_accuracy`)."""
    from lightning_sd.config import ConfigError

    value = metrics
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            have = sorted(value) if isinstance(value, dict) else []
            raise ConfigError(f"optimized_metric={name}: metrics.json has no {part!r} there (keys: {have})")
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"optimized_metric={name} is {value!r}, not a number")
    return float(value)


def check_search(cfg: DictConfig, search: str | None, sweeper: str | None) -> None:
    """A recipe search (an `hparams_search` option, or any Optuna sweep) needs `optimized_metric`: the number
    each trial returns. (Its split rule is `lightning_sd.config.check_objective`, part of `validate_config`.)"""
    from lightning_sd.config import ConfigError

    if (search or "optuna" in (sweeper or "")) and cfg.get("optimized_metric") is None:
        raise ConfigError(f"hparams_search={search}: a search needs optimized_metric, the metrics.json key each "
                          "trial returns (e.g. optimized_metric=eval_after.student_accuracy)")


def hydra_facts() -> dict:
    """The run's command-line overrides (a search trial's: the sampled values too), the `hparams_search`
    option and the trial's number in a multirun; empty without a Hydra context (train.main called directly)."""
    from hydra.types import RunMode

    try:
        hc = hydra.core.hydra_config.HydraConfig.get()
    except ValueError:
        return {}
    facts = {"overrides": list(hc.overrides.task), "hparams_search": hc.runtime.choices.get("hparams_search")}
    if hc.mode == RunMode.MULTIRUN:
        facts["job_num"] = hc.job.num
    return facts


def interrupted_message(stop, run_dir: str) -> str:
    """What an interrupted run prints: what was saved, the exit status, and the command that resumes it."""
    try:
        overrides = [o for o in hydra.core.hydra_config.HydraConfig.get().overrides.task
                     if not o.startswith(("ckpt_path=", "hydra.run.dir="))]
    except (ValueError, AttributeError):  # no Hydra context (train.main called directly)
        overrides = ["<the same overrides>"]
    saved = (f"{stop.checkpoint} holds step {stop.step}" if stop.checkpoint else
             "no checkpoint was written yet")
    how = "the step in progress was abandoned; " if stop.abandoned else ""
    return (f"[interrupted] {stop.signal_name}: {how}{saved}; metrics.json is marked interrupted; exit status "
            f"{stop.code}. Resume with:\n  python train.py {' '.join(map(shlex.quote, overrides + ['ckpt_path=last']))} "
            f"hydra.run.dir={shlex.quote(run_dir)}")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> dict:
    """One run. From the command line a known user error ends it with its message alone and status 1; called in
    a process of one's own (`main.__wrapped__(cfg)`), it raises."""
    from lightning_sd.console import header_lines, quiet_framework_warnings, tidy_framework_logging

    tidy_framework_logging()
    quiet_framework_warnings()
    hc = hydra.core.hydra_config.HydraConfig.get()
    run_dir = hc.runtime.output_dir
    check_search(cfg, hc.runtime.choices.get("hparams_search"), hc.sweeper.get("_target_"))
    if cfg.get("verbose"):
        print(OmegaConf.to_yaml(cfg, resolve=True))
    else:
        print("\n".join(header_lines(cfg, run_dir)), flush=True)
    try:
        metrics = train_and_evaluate(cfg, run_dir)
        return metrics["objective"]["value"] if cfg.get("optimized_metric") else metrics
    except BaseException as err:
        if isinstance(err, (KeyboardInterrupt, SystemExit)) or type(err).__name__ == "Interrupted":
            raise
        full = bool(cfg.get("verbose")) or os.environ.get("HYDRA_FULL_ERROR") == "1"
        if AS_COMMAND and is_user_error(err) and not full:  # the message alone: it names what to change
            print(f"{type(err).__name__}: {err}\n(the run's config: {os.path.join(run_dir, '.hydra', 'config.yaml')}; "
                  "verbose=true or HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        if not cfg.get("verbose"):
            print("The run stopped with an error; its config was:\n" + OmegaConf.to_yaml(cfg, resolve=True), flush=True)
        raise


def is_user_error(err: BaseException) -> bool:
    """A known user error (a bad key, bad data, a model or checkpoint that cannot be loaded): its message says
    what to change, so the run prints it alone."""
    from lightning_sd.callbacks.checkpoint_io import CheckpointError
    from lightning_sd.config import ConfigError
    from lightning_sd.data.records import DataError
    from lightning_sd.models import ModelLoadError
    from lightning_sd.rollout_backends.vllm import VllmError

    return isinstance(err, (ConfigError, DataError, ModelLoadError, CheckpointError, VllmError))


def train_and_evaluate(cfg: DictConfig, run_dir: str) -> dict:
    """The run itself: evaluate, train, evaluate, write `metrics.json`, print the summary. `metrics.json` holds
    the resolved config, seed, command-line overrides, git commit, machine and load (`machine`), start and end
    times, the evaluations, the run means of the step diagnostics (`train_diagnostics`), the per-step `train/*`
    values of the CSV log (`history`) and, with `optimized_metric`, the `objective` a search trial returns."""
    from lightning_sd.build import build_logger, prepare_run
    from lightning_sd.callbacks.run_checkpoint import Interrupted
    from lightning_sd.console import eval_progress, peak_memory_gib, summary_table
    from lightning_sd.evaluation import evaluate_run
    from lightning_sd.logging_utils import finish_logger, git_commit, log_config, log_eval, machine, train_history

    t_start = time.perf_counter()
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, run_dir)
    run = prepare_run(cfg, run_dir)
    module, datamodule = run.module, run.datamodule
    logger = build_logger(run.typed["logger"], run_dir, resume=ckpt_path is not None)
    log_config(logger, OmegaConf.to_container(cfg, resolve=True))
    e = run.typed["eval"]
    device = torch.device("cuda" if run.typed["trainer"].accelerator in ("gpu", "cuda") and torch.cuda.is_available()
                          else "cpu")
    metrics: dict = {"config": OmegaConf.to_container(cfg, resolve=True), "seed": cfg.seed,
                     "git_commit": git_commit(os.path.dirname(os.path.abspath(__file__))), "run_dir": run_dir,
                     "machine": machine(),
                     "started": time.strftime("%Y-%m-%d %H:%M:%S"), **hydra_facts()}

    if ckpt_path is not None:  # the first part's evaluation before training, from its metrics.json
        metrics.update(earlier_results(run_dir), resumed_from=ckpt_path)

    def run_eval(tag: str) -> None:
        module.to(device)
        total = len(getattr(datamodule, "eval_records", None) or []) * (2 if e.teacher else 1)
        with eval_progress(f"eval {tag}", total, enabled=run.typed["trainer"].enable_progress_bar) as advance:
            r = metrics[f"eval_{tag}"] = evaluate_run(module, datamodule, with_teacher=e.teacher, samples=e.samples,
                                                      temperature=e.temperature, seed=cfg.seed, progress=advance)
        if r["n"] == 0:
            print(f"[eval {tag}] no evaluation prompts (data.n_eval=0, or an empty eval set): nothing evaluated",
                  flush=True)
            return
        log_eval(logger, tag, r, step=trainer.global_step if trainer is not None else 0)
        teacher = "n/a" if r["teacher_accuracy"] is None else f"{r['teacher_accuracy']:.3f}"
        print(f"[eval {tag}] student accuracy {r['student_accuracy']:.3f}  teacher-with-context accuracy "
              f"{teacher}  (n={r['n']}, mean completion {r['mean_completion_tokens']:.1f} tokens, "
              f"{r['seconds']:.1f} s)" + (f"  verifier failures {r['verifier_failures']}"
                                          if r["verifier_failures"] else ""), flush=True)
        if e.samples:
            sampled = r["sampled"]
            print(f"[eval {tag}] student sampled accuracy {sampled['student_accuracy']:.3f}  ({e.samples} per prompt "
                  f"at temperature {e.temperature}, n={sampled['n']})", flush=True)
        for label, probe in r.get("probes", {}).items():
            print(f"[eval {tag}] {label} (a probe, never trained): student accuracy {probe['student_accuracy']:.3f}  "
                  f"(n={probe['n']})", flush=True)

    trainer = None
    if e.before and ckpt_path is None:
        run_eval("before")
    trainer = run.trainer(logger=logger, enable_model_summary=bool(cfg.get("verbose")))
    t0 = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except Interrupted as stop:  # SIGTERM / SIGINT: last.ckpt is written; record, say how to resume, exit 128+N
        metrics.update(train_seconds=time.perf_counter() - t0, interrupted=stop.record(),
                       train_diagnostics=module.diagnostics_summary(), total_seconds=time.perf_counter() - t_start)
        if trainer.global_rank == 0:
            with open(os.path.join(run_dir, "metrics.json"), "w") as f:
                json.dump(metrics, f, indent=2, default=str)
            print(interrupted_message(stop, run_dir), flush=True)
        finish_logger(logger)
        raise
    metrics["train_seconds"] = time.perf_counter() - t0
    metrics["train_metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics["train_diagnostics"] = module.diagnostics_summary()  # run means of the step diagnostics, skip counts
    if run.typed["callbacks"].export_model:
        metrics["model_folder"] = export_trained(trainer, module, run_dir, run.typed["callbacks"].export_merged_lora)
    if e.after:
        run_eval("after")
    metrics["total_seconds"] = time.perf_counter() - t_start
    metrics["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    metrics["global_step"] = trainer.global_step
    metrics["peak_memory_gib"] = peak_memory_gib()
    metrics["history"] = train_history(run_dir)  # the CSV logger's rows (written at the end of fit)
    if cfg.get("optimized_metric"):
        metrics["objective"] = {"metric": cfg.optimized_metric,
                                "value": objective_value(metrics, cfg.optimized_metric)}
    if trainer.global_rank != 0:  # under DDP every rank runs this script; rank 0 writes the results
        return metrics
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2, default=str)
    print(summary_table(metrics, run_dir), flush=True)
    finish_logger(logger)
    return metrics


def export_trained(trainer, module, run_dir: str, merge_lora: bool) -> str | None:
    """Rank 0 writes the student to `<run folder>/model/` (`lightning_sd.export`); returns the folder. Under FSDP
    or DeepSpeed no rank holds the whole student: the last checkpoint is exported instead, by command."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    from lightning_sd.export import export_model

    folder = os.path.join(run_dir, "model")
    if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):
        if trainer.global_rank == 0:
            print(f"[export] the student is sharded: export it with python -m lightning_sd.export "
                  f"{os.path.join(run_dir, 'checkpoints', 'last.ckpt')} {folder}", flush=True)
        return None
    if trainer.global_rank != 0:
        return None
    export_model(module.student, module.tokenizer, folder, merge_lora=merge_lora)
    return folder


HYDRA_FLAGS_WITH_VALUE = ("--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-path", "-cp",
                          "--config-dir", "-cd", "--info", "-i", "--experimental-rerun")


def config_overrides(argv: list[str]) -> list[str]:
    """The config overrides of a command line: without Hydra's flags (and their values) and `hydra.*`."""
    overrides, skip = [], False
    for a in argv:
        if skip or a in HYDRA_FLAGS_WITH_VALUE:
            skip = not skip and a in HYDRA_FLAGS_WITH_VALUE
            continue
        if not a.startswith("-") and not a.startswith(("hydra.", "hydra/", "+hydra", "~hydra")):
            overrides.append(a)
    return overrides


def check_renamed(argv: list[str]) -> None:
    """A renamed key on the command line (`loss.lam=0.9`) stops the run with its new name, before Hydra would
    reject it as an unknown key. Exits with status 1 and the message."""
    from lightning_sd.config import ConfigError, check_renamed_overrides

    try:
        check_renamed_overrides(config_overrides(argv))
    except ConfigError as err:
        raise SystemExit(f"ConfigError: {err}") from None


def search_option(overrides: list[str]) -> str | None:
    """The `hparams_search=<name>` of the command line's overrides, if any."""
    found = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("hparams_search=")]
    return found[-1] if found else None


def check_before_printing(argv: list[str]) -> None:
    """`--cfg job|all`: Hydra prints the composed config and never runs `main`; validate it first, so that a
    config the run would reject is not printed as if it were fine. A recipe search (`hparams_search=<name>`)
    is validated here too, before its first trial starts (e.g. the rule that it scores trials on the
    validation split). Exits with status 1 and the message."""
    overrides = config_overrides(argv)
    search = search_option(overrides)
    if not search and not any(a in ("--cfg", "-c") or a.startswith("--cfg=") for a in argv):
        return
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from lightning_sd.config import ConfigError, validate_config

    conf = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")
    try:  # a search's own sweep overrides (`loss.beta=choice(0.5,1.0)`) are the sampler's; check the rest
        overrides = [o.input_line for o in OverridesParser.create().parse_overrides(overrides)
                     if not o.is_sweep_override()]
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            cfg = compose("train", overrides=overrides)
    except Exception:  # noqa: BLE001 - an override Hydra cannot apply: Hydra's own run reports it
        hydra.core.global_hydra.GlobalHydra.instance().clear()
        return
    try:
        check_search(cfg, search, None)
        validate_config(cfg)
    except ConfigError as err:
        raise SystemExit(f"ConfigError: {err}") from None
    hydra.core.global_hydra.GlobalHydra.instance().clear()  # Hydra's own run initializes it again


AS_COMMAND = False  # set when run as `python train.py`

if __name__ == "__main__":
    AS_COMMAND = True
    check_renamed(sys.argv[1:])
    check_before_printing(sys.argv[1:])
    main()
