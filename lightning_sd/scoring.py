"""What a training step computes from the student's and the teacher's scores of the completions, for any method:
the trainable tokens, the student's log-probs, the importance weights against the sampler, the per-token
divergence (full logits, or chunk by chunk from hidden states with `loss.chunk_size`), the method's terms reduced to
the loss (`method_loss`), and the step's diagnostics. `Scorer` holds the loss options and the two output embeddings, and
hands its pieces to the method through `methods.Step`.

Shapes: R rollout rows, C completion length, V vocabulary, H hidden size. `student_out` / `teacher_out` are
logits `[R, C, V]`, or final hidden states `[R, C, H]` when `loss.chunk_size` is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lightning_sd.batch import LossOutput
from lightning_sd.losses import (apply_importance_weight, chunked_divergence, clipped_teacher_mass,
                                 completion_mask_skip_first, importance_weight, reduce_loss)
from lightning_sd.losses.diagnostics import gradient_clipped_mass
from lightning_sd.losses.support import compute_dtype, prepare_logits
from lightning_sd.methods import Method, Step, is_dataset_rollout
from lightning_sd.objectives import LossConfig, distillation_terms, token_logprobs, token_logprobs_from_hidden
from lightning_sd.sampling import Rollout, SamplingConfig, sampler_token_logprobs


@dataclass
class Scorer:
    """`loss`: the options; `student_weight()` / `teacher_weight()`: the student's output embedding `[V, H]`
    (with grad) and the teacher's (detached), read only with `loss.chunk_size`."""

    loss: LossConfig
    student_weight: Callable[[], torch.Tensor]
    teacher_weight: Callable[[], torch.Tensor]

    def trainable_mask(self, rollout: Rollout) -> torch.Tensor:
        """`[R, C]` the completion tokens that may train: `completion_mask` without the first `loss.skip_first`
        tokens of each row (the one place `skip_first` is applied)."""
        mask, skip = rollout.completion_mask, self.loss.skip_first
        return completion_mask_skip_first(mask, skip) if skip else mask

    def step(self, student_out: torch.Tensor, teacher_out: torch.Tensor | None, rollout: Rollout, records: list[dict],
             rewards: list[float | None] | None, row_mask: torch.Tensor) -> Step:
        """The `Step` a method's `terms` reads: this scorer's pieces bound to the step's scores."""
        step = Step(rollout=rollout, records=records, rewards=rewards, mask=self.trainable_mask(rollout),
                    row_mask=row_mask, logprobs=lambda: self.student_logprobs(student_out, rollout),
                    distillation=lambda mask: self.distillation(student_out, teacher_out, rollout, mask,
                                                                step.importance_weights),
                    _weights=lambda: self.importance_weights(student_out, rollout))
        return step

    def method_loss(self, method: Method, step: Step) -> LossOutput:
        """The method's per-token terms of `step`, reduced (`reduce`)."""
        terms = method.terms(step)
        return self.reduce(terms.per_token, terms.mask, signal=terms.signal)

    def student_logprobs(self, student_out: torch.Tensor, rollout: Rollout) -> torch.Tensor:
        """`[R, C]` student log-probs of the completion tokens at `loss.temperature` (with grad), from logits
        `[R, C, V]` or, with `loss.chunk_size`, from hidden states chunk by chunk."""
        cfg = self.loss
        if not cfg.chunk_size:
            return token_logprobs(student_out, rollout.completion_ids, cfg.temperature)
        keep = rollout.completion_mask.bool()
        values = token_logprobs_from_hidden(student_out[keep], self.student_weight(),
                                            rollout.completion_ids[keep], cfg.chunk_size, cfg.temperature)
        return torch.zeros(keep.shape, dtype=values.dtype, device=values.device).masked_scatter(keep, values)

    def importance_weights(self, student_out: torch.Tensor, rollout: Rollout) -> torch.Tensor | None:
        """`[R, C]` detached token-level importance weights `min(exp(log S(y) - log S_sampler(y)), loss.is_clip)`,
        or None when `loss.is_clip` is null or the completions were not sampled (dataset rows).

        `log S(y)` is the trainer's log-prob of each sampled token under exactly the distribution the sampler
        drew from (`rollout.sampling`: its temperature, top-k and top-p), so the weight is 1 when the sampler
        ran the same weights, whatever the sampling settings. `student_out`: logits `[R, C, V]`, or final hidden
        states `[R, C, H]` with `loss.chunk_size`. Padding positions get weight 1."""
        cfg = self.loss
        if cfg.is_clip is None or is_dataset_rollout(rollout):
            return None
        config = rollout.sampling if rollout.sampling is not None else SamplingConfig(do_sample=False)
        keep = rollout.completion_mask.bool()
        if cfg.chunk_size:
            weight = self.student_weight().detach()
            hidden, tokens = student_out.detach()[keep], rollout.completion_ids[keep]
            values = torch.cat([sampler_token_logprobs(hidden[a:a + cfg.chunk_size] @ weight.T,
                                                       tokens[a:a + cfg.chunk_size], config)
                                for a in range(0, hidden.size(0), cfg.chunk_size)]
                               or [hidden.new_zeros(0, dtype=compute_dtype(hidden))])
            logp = torch.zeros(keep.shape, dtype=values.dtype, device=values.device).masked_scatter(keep, values)
        else:
            logp = sampler_token_logprobs(student_out, rollout.completion_ids, config)
        w = importance_weight(logp, rollout.logprobs, cfg.is_clip)
        if keep.any():  # logged as train/importance_weight (its mean over the sampled tokens; about 1 in sync)
            rollout.extras["importance_weight"] = float(w[keep].mean())
        return torch.where(keep, w, torch.ones_like(w))

    def distillation(self, student_out, teacher_out, rollout: Rollout, mask: torch.Tensor,
                     is_weight: torch.Tensor | None) -> torch.Tensor:
        """`[R, C]` per-token divergence on `mask` (already without `skip_first`), times `is_weight` (the
        step's importance weights, or None)."""
        if self.loss.chunk_size:
            return self._chunked_terms(student_out, teacher_out, rollout, mask, is_weight)
        return distillation_terms(student_out, teacher_out, rollout.completion_ids, mask, self.loss,
                                  is_weight=is_weight)[0]

    def _chunked_terms(self, student_h, teacher_h, rollout: Rollout, mask: torch.Tensor,
                       weights: torch.Tensor | None) -> torch.Tensor:
        cfg = self.loss
        keep = mask.bool()
        t_weight = self.teacher_weight()
        s_weight = self.student_weight()
        values = chunked_divergence(student_h[keep], s_weight, teacher_h[keep].detach(), t_weight,
                                    chunk_size=cfg.chunk_size, tokens=rollout.completion_ids[keep],
                                    **cfg.divergence_kwargs())
        values = apply_importance_weight(values, None if weights is None else weights[keep])
        per_token = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
        return per_token.masked_scatter(keep, values)

    def reduce(self, per_token: torch.Tensor, mask: torch.Tensor, signal: torch.Tensor | None = None) -> LossOutput:
        """`loss`: the sum of the terms on mask (per sequence with sequence_mean), `value`: normalized for logging,
        `per_token`, `mask` (float), `count`: the local normalizer, `signal`: `[R, C]` bool."""
        reduction = self.loss.reduction
        mask_f = mask.to(per_token.dtype)
        if reduction == "sequence_mean":
            count = float((mask_f.sum(-1) > 0).sum())
        elif reduction == "token_mean":
            count = float(mask_f.sum())
        else:
            count = 1.0
        loss_sum = reduce_loss(per_token, mask_f, "sum" if reduction == "token_mean" else reduction,
                               **({"num_sequences": 1} if reduction == "sequence_mean" else {}))
        value = loss_sum.detach() / max(count, 1.0)
        signal = mask.bool() if signal is None else signal.bool() & mask.bool()
        return LossOutput(loss=loss_sum, value=value, per_token=per_token, mask=mask_f, count=count, signal=signal)

    @torch.no_grad()
    def diagnostics(self, student_out: torch.Tensor, teacher_out: torch.Tensor | None, rollout: Rollout,
                    out: LossOutput, row_mask: torch.Tensor) -> dict[str, float]:
        """What this step teaches, as plain floats (logged as `train/<key>`, averaged into `metrics.json`):

        - `no_signal_rows`: share of rollout rows with no loss-bearing token (masked: no context, no successful
          sibling; GRPO: zero advantage; every token skipped).
        - `teacher_advantage`, `teacher_advantage_std`: mean and spread over the trained positions of
          `log T(y_t) - log S(y_t)` at `loss.temperature`, the teacher's per-token advantage of the sampled text
          (> 0: the teacher likes the student's own tokens better than the student does).
        - `clipped_teacher_mass` (with `loss.entry_clip`): the share of the teacher's probability mass on entries
          the clip bounds, averaged over the trained positions of the step's first 4 rollout rows (a sample:
          computing it for every row costs about as much as the loss itself).
        - `importance_weight` (with `loss.is_clip`, on sampled steps): the mean importance weight of the sampled
          tokens; about 1 while the sampler runs the trainer's weights in the trainer's dtype.
        Teacher-free methods (SFT, GRPO) report `no_signal_rows` only."""
        values = {"no_signal_rows": float((~out.signal.any(-1)).float().mean())}
        if "importance_weight" in rollout.extras:
            values["importance_weight"] = rollout.extras["importance_weight"]
        if teacher_out is None:
            return values
        mask = self.trainable_mask(rollout)
        keep = (mask * row_mask[:, None].to(mask.dtype)).bool()
        if not keep.any():
            return values
        advantage, clipped = self.token_diagnostics(student_out, teacher_out, rollout.completion_ids)
        advantage = advantage[keep]
        values["teacher_advantage"] = float(advantage.mean())
        values["teacher_advantage_std"] = float(advantage.std(unbiased=False))
        if clipped is not None and keep[: clipped.size(0)].any():
            values["clipped_teacher_mass"] = float(clipped[keep[: clipped.size(0)]].mean())
        return values

    @torch.no_grad()
    def token_diagnostics(self, student_out: torch.Tensor, teacher_out: torch.Tensor, tokens: torch.Tensor,
                           rows: int = 4) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`([R, C] log T(y) - log S(y) at loss.temperature, [min(R, rows), C] teacher mass on clipped entries of
        the first `rows` rows, or None)` from logits `[R, C, V]` (or, with `loss.chunk_size`, hidden states
        `[R, C, H]` through each model's output embedding), `rows` rows at a time; no grad."""
        cfg = self.loss
        s_weight = t_weight = None
        if cfg.chunk_size:
            s_weight, t_weight = self.student_weight().detach(), self.teacher_weight()
        closed_form = cfg.entry_clip_mode == "gradient" and cfg.support == "full" and cfg.beta in (0.0, 1.0)
        advantage, clipped = [], []
        for a in range(0, student_out.size(0), rows):
            s, t = student_out[a:a + rows].detach(), teacher_out[a:a + rows].detach()
            if s_weight is not None:
                s, t = s @ s_weight.T, t @ t_weight.T
            s_scaled = prepare_logits(s, compute_dtype(s, t), cfg.temperature)
            t_scaled = prepare_logits(t, compute_dtype(s, t), cfg.temperature)
            ids = tokens[a:a + rows, :, None]
            s_lse, t_lse = s_scaled.logsumexp(-1, keepdim=True), t_scaled.logsumexp(-1, keepdim=True)
            advantage.append(((t_scaled.gather(-1, ids) - t_lse) - (s_scaled.gather(-1, ids) - s_lse)).squeeze(-1))
            if cfg.entry_clip is not None and a == 0:  # the first block only: a sample, at a quarter of the cost
                clipped.append(gradient_clipped_mass(s_scaled - s_lse, t_scaled - t_lse, float(cfg.beta),
                                                     cfg.entry_clip) if closed_form
                               else clipped_teacher_mass(s, t, tokens=tokens[a:a + rows], **cfg.divergence_kwargs()))
        return torch.cat(advantage), (torch.cat(clipped) if clipped else None)


__all__ = ["Scorer"]
