"""Per-token views: a self-contained HTML page that colours every completion token by its teacher-student
divergence, with the teacher's top alternatives on hover. Pure functions, no Lightning: the `TokenView`
callback (`lightning_sd.callbacks.token_view`) calls them every N steps.

Colour: one scale per page, `vmax = max |value|` over the trained tokens shown. Positive values are red,
negative values blue (the sampled-token estimator `log S(y) - log T(y)` can be negative), with opacity
`|value| / vmax`; tokens outside the loss mask (padding after the stop token is never shown; skipped first
tokens, masked rows) are grey and underlined with dots. The value is the per-token loss term the
objective trained on (`batch.loss_terms["per_token"]`): for `beta=0` the forward KL(T||S) of that
position, for `beta=1` the reverse KL(S||T), in nats.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from lightning_sd.batch import StepBatch

POSITIVE = (214, 39, 40)  # red: the student's distribution is far from the teacher's here
NEGATIVE = (31, 119, 180)  # blue: negative per-token value (sampled estimator only)


@dataclass
class TokenRow:
    """One completion to show. `tokens[t]` is the text of completion token t (they concatenate to the
    completion), `values[t]` its per-token divergence, `trained[t]` whether the loss counted it."""

    prompt: str
    tokens: list[str]
    values: list[float]
    trained: list[bool]
    reward: float | None = None
    sampler_probs: list[float] | None = None  # probability the sampler gave the chosen token
    alternatives: list[list[tuple[str, float]]] | None = None  # teacher's top-k (token text, prob) per position
    title: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def mean_value(self) -> float | None:
        kept = [v for v, t in zip(self.values, self.trained) if t]
        return sum(kept) / len(kept) if kept else None


def _pieces(decode, ids: list[int], window: int | None) -> list[str]:
    """Each token's text = what it adds to the decoded text before it (same window start for both decodes);
    a trailing U+FFFD (a character not complete yet) is not counted until the token that completes it."""
    pieces = []
    last = len(ids) - 1
    for t in range(len(ids)):
        s = 0 if window is None else max(0, t - window)
        before = decode(ids[s:t]).rstrip("\ufffd") if t > s else ""
        after = decode(ids[s:t + 1])
        after = after if t == last else after.rstrip("\ufffd")
        pieces.append(after[len(before):] if after.startswith(before) else "")
    return pieces


def token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The text of each token, such that `"".join(pieces) == tokenizer.decode(ids)` (special tokens kept).

    Decoding token by token breaks characters that span several byte-level tokens and drops SentencePiece's
    leading spaces; here each piece is what the token adds to the text before it (decoded over a short
    window), and a token that ends inside a character gets "" (the next one carries the character)."""
    ids = [int(i) for i in ids]

    def decode(x: list[int]) -> str:
        return tokenizer.decode(x, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    full = decode(ids)
    for window in (16, None):  # fast path, then the exact (quadratic) prefix walk
        pieces = _pieces(decode, ids, window)
        if "".join(pieces) == full and len(pieces) == len(ids):
            return pieces
    return [""] * (len(ids) - 1) + [full] if ids else []


def colour(value: float, vmax: float) -> str:
    """CSS background for `value` on a scale whose strongest colour is at `|value| = vmax`."""
    if not math.isfinite(value):
        return "rgba(0, 0, 0, 1.000)"
    alpha = 0.0 if vmax <= 0 else min(1.0, abs(value) / vmax)
    r, g, b = POSITIVE if value >= 0 else NEGATIVE
    return f"rgba({r}, {g}, {b}, {alpha:.3f})"


def _attr(text: str) -> str:
    """An HTML attribute value; newlines kept as character references (CSS `content: attr()` shows them)."""
    return html.escape(text).replace("\n", "&#10;")


def _visible(piece: str) -> str:
    """Whitespace made visible enough to hover: newlines as a return arrow plus the newline."""
    if piece == "":
        return "\u200b"  # zero-width: the span still exists (a token that ends inside a character)
    return html.escape(piece.replace("\n", "\u21b5\n"))


def tooltip(row: TokenRow, t: int) -> str:
    """The hover text of token t (one fact per line)."""
    parts = [f"token {t}: {row.tokens[t]!r}", f"divergence {row.values[t]:.4f}"]
    if not row.trained[t]:
        parts.append("not in the loss (masked)")
    if row.sampler_probs is not None:
        parts.append(f"sampler p = {row.sampler_probs[t]:.3f}")
    if row.alternatives is not None and row.alternatives[t]:
        alts = ", ".join(f"{text!r} {p:.3f}" for text, p in row.alternatives[t])
        parts.append(f"teacher top: {alts}")
    return "\n".join(parts)


CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px; color: #222; max-width: 1100px; }
h1 { font-size: 20px; margin-bottom: 4px; }
.meta { color: #555; font-size: 13px; margin-bottom: 16px; }
.legend { display: flex; align-items: center; gap: 8px; font-size: 13px; margin: 8px 0 20px; }
.legend .bar { width: 240px; height: 14px; border: 1px solid #ccc;
  background: linear-gradient(to right, rgba(31,119,180,1), rgba(31,119,180,0) 50%, rgba(214,39,40,0) 50%,
  rgba(214,39,40,1)); }
.row { border: 1px solid #ddd; border-radius: 6px; padding: 10px 14px; margin-bottom: 14px; }
.row h2 { font-size: 14px; margin: 0 0 6px; font-weight: 600; }
.prompt { white-space: pre-wrap; color: #444; font-size: 13px; background: #f6f6f6; padding: 6px 8px;
  border-radius: 4px; margin-bottom: 8px; }
.completion { font-family: "SFMono-Regular", Menlo, Consolas, monospace; font-size: 14px; line-height: 1.9;
  white-space: pre-wrap; word-break: break-word; }
.tok { border-radius: 3px; padding: 1px 0; cursor: default; position: relative; }
.tok:hover { outline: 2px solid #111; }
.tok:hover::after, .tok.pin::after { content: attr(data-tip); position: absolute; left: 0; top: 1.7em; z-index: 10;
  white-space: pre; background: #222; color: #fff; font-size: 12px; line-height: 1.4; padding: 5px 8px;
  border-radius: 4px; box-shadow: 0 2px 6px rgba(0,0,0,.3); pointer-events: none; }
.tok.masked { color: #999; text-decoration: underline dotted #bbb; }
"""


def render_html(rows: Sequence[TokenRow], title: str = "Per-token divergence", meta: str = "",
                vmax: float | None = None) -> str:
    """A complete HTML page (no external resources) with one block per row. Each completion token is a
    `<span class="tok" data-t=.. data-value=.. data-trained=0|1 style="background-color: rgba(..)"
    data-tip="..">` in completion order; `data-tip` is shown on hover (CSS, no script)."""
    if vmax is None:
        trained = [abs(v) for r in rows for v, t in zip(r.values, r.trained) if t and math.isfinite(v)]
        vmax = max(trained, default=0.0)
    out = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">", f"<title>{html.escape(title)}</title>",
           f"<style>{CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    if meta:
        out.append(f"<div class=\"meta\">{html.escape(meta)}</div>")
    out.append(f"<div class=\"legend\"><span>-{vmax:.3g}</span><span class=\"bar\"></span><span>+{vmax:.3g} "
               "nats</span><span>&nbsp;hover a token for its value and the teacher's top alternatives</span></div>")
    for i, row in enumerate(rows):
        mean = row.mean_value
        head = [row.title or f"completion {i}"]
        if row.reward is not None:
            head.append(f"reward {row.reward:g}")
        head.append("mean divergence " + ("n/a" if mean is None else f"{mean:.4f}"))
        head.append(f"{len(row.tokens)} tokens")
        out.append(f"<div class=\"row\" data-row=\"{i}\"><h2>{html.escape(' · '.join(head))}</h2>")
        spans = [f"<div class=\"prompt\">{html.escape(row.prompt)}</div><div class=\"completion\">"]
        for t, (piece, value, trained) in enumerate(zip(row.tokens, row.values, row.trained)):
            style = f"background-color: {colour(value, vmax)}" if trained else "background-color: rgba(0, 0, 0, 0.000)"
            spans.append(f"<span class=\"tok{'' if trained else ' masked'}\" data-t=\"{t}\" data-value=\"{value:.6g}\" "
                         f"data-trained=\"{int(trained)}\" style=\"{style}\" data-tip=\"{_attr(tooltip(row, t))}\">"
                         f"{_visible(piece)}</span>")
        out.append("".join(spans) + "</div></div>")  # no newline inside the pre-wrap block
    out.append("</body></html>")
    return "\n".join(out)


def describe_diagnostics(diagnostics: dict[str, float], truncated: float) -> str:
    """One line for a page's header from `SelfDistillationModule.step_diagnostics` and the step's share of
    truncated rollouts, e.g. `cut 62% · no-signal rows 0% · teacher advantage +0.120 ± 0.800 nats`."""
    parts = [f"cut {truncated:.0%}", f"no-signal rows {diagnostics.get('no_signal_rows', 0.0):.0%}"]
    if "teacher_advantage" in diagnostics:
        parts.append(f"teacher advantage {diagnostics['teacher_advantage']:+.3f} ± "
                     f"{diagnostics.get('teacher_advantage_std', 0.0):.3f} nats")
    if "clipped_teacher_mass" in diagnostics:
        parts.append(f"teacher mass on clipped entries {diagnostics['clipped_teacher_mass']:.1%}")
    return " · ".join(parts)


# ---------------------------------------------------------------------------------------------- from a batch

@torch.no_grad()
def teacher_topk(module: Any, teacher_out: torch.Tensor, k: int, row_chunk: int = 4) -> dict[str, torch.Tensor]:
    """The teacher's top-k tokens per completion position: `{"ids": [R, C, k] long, "probs": [R, C, k] float}`,
    at the loss temperature. `teacher_out` is what `module.teacher_forward` returned: logits `[R, C, V]`, or
    final hidden states `[R, C, H]` when `loss.chunk_size` is set (then the teacher's output embedding is
    applied here, a few rows at a time)."""
    temperature = module.loss_cfg.temperature
    weight = module.teacher_output_weight() if module.loss_cfg.chunk_size else None
    ids, probs = [], []
    for start in range(0, teacher_out.size(0), row_chunk):
        block = teacher_out[start:start + row_chunk].detach()
        logits = block @ weight.T if weight is not None else block
        p = (logits.float() / temperature).softmax(-1)
        top = p.topk(min(k, p.size(-1)), dim=-1)
        ids.append(top.indices)
        probs.append(top.values)
    return {"ids": torch.cat(ids).cpu(), "probs": torch.cat(probs).cpu()}


def rows_from_batch(batch: StepBatch, tokenizer: Any, rows: Sequence[int]) -> list[TokenRow]:
    """`TokenRow`s for rollout rows `rows` of a trained batch (after `training_step`: it needs
    `batch.loss_terms`, and uses `teacher_topk` there when the module kept it)."""
    rollout = batch.rollout
    terms = batch.loss_terms
    per_token, mask = terms["per_token"].float().cpu(), terms["mask"].cpu()
    top = terms.get("teacher_topk")
    records = batch.records
    rewards = batch.rewards
    out = []
    for r in rows:
        valid = rollout.completion_mask[r].bool().cpu()
        n = int(valid.sum())
        ids = rollout.completion_ids[r].cpu()[:n].tolist()
        alternatives = None
        if top is not None:
            alternatives = [[(tokenizer.decode([int(i)], skip_special_tokens=False), float(p))
                             for i, p in zip(top["ids"][r, t].tolist(), top["probs"][r, t].tolist())]
                            for t in range(n)]
        record = records[int(rollout.prompt_index[r])]
        out.append(TokenRow(
            prompt=str(record.get("prompt", "")), tokens=token_pieces(tokenizer, ids),
            values=per_token[r, :n].tolist(), trained=[bool(m) for m in mask[r, :n].tolist()],
            reward=None if rewards is None else rewards[r],
            sampler_probs=rollout.logprobs[r, :n].float().exp().cpu().tolist(), alternatives=alternatives,
            title=f"row {r} (prompt {record.get('id', int(rollout.prompt_index[r]))})"))
    return out


__all__ = ["TokenRow", "colour", "describe_diagnostics", "render_html", "rows_from_batch", "teacher_topk", "token_pieces", "tooltip"]
