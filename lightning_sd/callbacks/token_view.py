"""`TokenView`: every N optimizer steps, an HTML page colouring each token of a few sampled completions by
its teacher-student divergence, with the teacher's top alternatives on hover. Saved as
`<run folder>/token_views/step_000010.html` and, with a W&B logger, logged as `token_view` (an HTML panel).

On the steps it renders it asks for the teacher's alternatives (`wants_teacher_topk`, which the module reads
from its callbacks at the training step), so the module keeps the teacher's top-k tokens and probabilities per completion token in `batch.loss_terms` (computed
from the logits the loss already has; other steps pay nothing).
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch import Callback

from lightning_sd.files import atomic_write_text
from lightning_sd.logging_utils import run_folder, wandb_run
from lightning_sd.token_heatmap import describe_diagnostics, render_html, rows_from_batch


class TokenView(Callback):
    """Args: `every_n_steps` (render on optimizer steps 0, N, 2N, ...), `rows` (completions per page: the
    first sample of each prompt first), `topk` (teacher alternatives per token; 0 = none), `folder`
    (default `<run folder>/token_views`)."""

    def __init__(self, every_n_steps: int = 10, rows: int = 4, topk: int = 3, folder: str | None = None) -> None:
        if every_n_steps < 1 or rows < 1 or topk < 0:
            raise ValueError(f"TokenView needs every_n_steps >= 1, rows >= 1, topk >= 0 "
                             f"(got {every_n_steps}, {rows}, {topk}): see callbacks.token_view_* in the config")
        self.every_n_steps, self.rows, self.topk, self.folder = every_n_steps, rows, topk, folder
        self._render = False
        self._step = 0
        self.written: list[Path] = []

    def _due(self, trainer, batch_idx: int) -> bool:
        first_micro_batch = batch_idx % max(1, trainer.accumulate_grad_batches) == 0
        return first_micro_batch and trainer.global_step % self.every_n_steps == 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._render, self._step = self._due(trainer, batch_idx), trainer.global_step

    def wants_teacher_topk(self) -> int:
        """The teacher alternatives per token this step should keep: `topk` on a step this callback renders,
        else 0 (read by `SelfDistillationModule.training_step`)."""
        return self.topk if self._render else 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._render or batch.loss_terms is None or batch.rollout is None:
            return
        self._render = False
        if not trainer.is_global_zero:
            return
        step = self._step  # the weights these scores come from: before this batch's optimizer step
        rollout = batch.rollout
        n = max(1, rollout.completion_ids.size(0) // max(1, len(batch.records)))
        order = sorted(range(rollout.completion_ids.size(0)), key=lambda r: (r % n, r))  # one per prompt first
        rows = rows_from_batch(batch, pl_module.tokenizer, order[: self.rows])
        cfg = pl_module.loss_cfg
        if getattr(pl_module, "needs_teacher", True):
            kind = {0.0: "forward KL(T||S)", 1.0: "reverse KL(S||T)"}.get(float(cfg.beta), "generalized JSD")
            meta = (f"step {step} · loss {cfg.name}, beta {cfg.beta} ({kind}), support {cfg.support}, "
                    f"teacher {pl_module.teacher.kind} · colour = per-token loss term (nats)")
        else:  # sft / grpo: no teacher, the colour is that method's own per-token term
            meta = f"step {step} · loss {cfg.name} (no teacher) · colour = per-token loss term"
        diagnostics = batch.diagnostics
        if diagnostics:
            meta += " · " + describe_diagnostics(diagnostics, float(rollout.truncated.float().mean()))
        html = render_html(rows, title=f"Per-token divergence, step {step}", meta=meta)
        folder = Path(self.folder or os.path.join(run_folder(trainer, pl_module), "token_views"))
        path = atomic_write_text(folder / f"step_{step:06d}.html", html)
        self.written.append(path)
        run = wandb_run(trainer)
        if run is not None:
            import wandb

            run.log({"token_view": wandb.Html(html, inject=False), "trainer/global_step": step})


__all__ = ["TokenView"]
