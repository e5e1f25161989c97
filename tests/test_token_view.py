"""Per-token HTML views (every completion token present, in order; colour follows the value; the teacher's top
alternatives on hover), through a real Trainer; and the step progress bar."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from lightning_sd.callbacks.progress import TrainingProgressBar
from lightning_sd.callbacks.token_view import TokenView
from lightning_sd.data.datamodule import PromptDataModule
from lightning_sd.callbacks.generation import OnPolicyGeneration
from lightning_sd.module import SelfDistillationModule
from lightning_sd.sampling import SamplingConfig
from lightning_sd.token_heatmap import TokenRow, colour, render_html, teacher_topk, token_pieces



class Spans(HTMLParser):
    """Collects every `<span class="tok ...">`: its attributes and text, grouped by row."""

    def __init__(self):
        super().__init__()
        self.rows: list[list[dict]] = []
        self._open: dict | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and "data-row" in a:
            self.rows.append([])
        if tag == "span" and "tok" in (a.get("class") or "").split():
            self._open = {**a, "text": ""}

    def handle_data(self, data):
        if self._open is not None:
            self._open["text"] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._open is not None:
            self.rows[-1].append(self._open)
            self._open = None


def parse(html: str) -> list[list[dict]]:
    p = Spans()
    p.feed(html)
    return p.rows


def alpha(span: dict) -> float:
    r, g, b, a = re.search(r"rgba\((\d+), (\d+), (\d+), ([\d.]+)\)", span["style"]).groups()
    return float(a)


def shown_text(span: dict) -> str:
    return span["text"].replace("\u21b5\n", "\n").replace("\u200b", "")


def test_renderer_keeps_every_token_in_order_and_colour_follows_value():
    row = TokenRow(prompt="2 + 3?", tokens=["The", " answer", " <b>is</b>", "\n", "", "5", "<|im_end|>"],
                   values=[0.5, 0.1, 2.0, 0.0, 1.0, -1.0, 0.3], trained=[False, True, True, True, True, True, True],
                   reward=1.0, sampler_probs=[0.9] * 7,
                   alternatives=[[("A", 0.6), ("B", 0.2)]] * 7)
    rows = parse(render_html([row], title="t"))
    (spans,) = rows
    assert [shown_text(s) for s in spans] == row.tokens  # every token, in order, escaped text round-trips
    assert [float(s["data-value"]) for s in spans] == row.values
    assert spans[0]["data-trained"] == "0" and "masked" in spans[0]["class"] and alpha(spans[0]) == 0.0
    trained = [s for s in spans if s["data-trained"] == "1"]
    by_value = sorted(trained, key=lambda s: abs(float(s["data-value"])))
    assert [alpha(s) for s in by_value] == sorted(alpha(s) for s in trained)  # monotone in |value|
    assert alpha(spans[2]) == 1.0 and alpha(spans[3]) == 0.0  # the largest |value| is full colour, 0 is none
    assert alpha(spans[4]) == pytest.approx(0.5)
    assert "214, 39, 40" in spans[4]["style"] and "31, 119, 180" in spans[5]["style"]  # + red, - blue
    assert "teacher top: 'A' 0.600, 'B' 0.200" in spans[1]["data-tip"] and "sampler p = 0.900" in spans[1]["data-tip"]
    assert spans[1]["data-tip"].splitlines()[:2] == ["token 1: ' answer'", "divergence 0.1000"]  # one fact a line
    assert colour(0.25, 1.0) == "rgba(214, 39, 40, 0.250)" and colour(-3.0, 1.0) == "rgba(31, 119, 180, 1.000)"


def test_token_pieces_join_to_the_decoded_text(tiny):
    _, tok = tiny
    ids = tok("naïve 日本 🙂\n<|im_end|>", add_special_tokens=False)["input_ids"]  # byte tokens split characters
    pieces = token_pieces(tok, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == tok.decode(ids, skip_special_tokens=False)
    assert "" in pieces and "日" in pieces and pieces[-1] == "<|im_end|>"


class Keep(Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append(batch)


def test_token_view_callback_writes_pages_that_match_the_batch(tiny, records, tmp_path):
    model, tok = tiny
    module = SelfDistillationModule(model, tok, teacher="frozen", loss={"template": "answer_hint", "beta": 0.5},
                                    optimizer={"lr": 1e-3}, run_dir=str(tmp_path))
    dm = PromptDataModule(tok, records=records, batch_size=2)
    view, keep = TokenView(every_n_steps=2, rows=3, topk=3), Keep()
    trainer = Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_model_summary=False, enable_progress_bar=True,
                      callbacks=[OnPolicyGeneration(SamplingConfig(n=2, max_new_tokens=10, temperature=1.5)), view,
                                 keep, TrainingProgressBar()])
    trainer.fit(module, datamodule=dm)

    assert [p.name for p in view.written] == ["step_000000.html", "step_000002.html"]
    assert ["teacher_topk" in b.loss_terms for b in keep.batches] == [True, False, True]  # only when shown
    assert view.wants_teacher_topk() == 0 and not hasattr(module, "keep_teacher_topk")  # a request, not a setting
    for path, batch in zip(view.written, (keep.batches[0], keep.batches[2])):
        rows = parse(path.read_text())
        rollout, terms = batch.rollout, batch.loss_terms
        assert len(rows) == 3
        shown = [0, 2, 1]  # the first sample of each prompt first (2 prompts x 2 samples)
        vmax = max(abs(v) for r in shown
                   for v, m in zip(terms["per_token"][r].tolist(), terms["mask"][r].tolist()) if m)
        for spans, r in zip(rows, shown):
            n = int(rollout.completion_mask[r].sum())
            ids = rollout.completion_ids[r, :n].tolist()
            assert len(spans) == n  # every completion token has its span
            assert "".join(shown_text(s) for s in spans) == tok.decode(ids, skip_special_tokens=False)
            for t, span in enumerate(spans):
                value = terms["per_token"][r, t].item()
                assert float(span["data-value"]) == pytest.approx(value, rel=1e-5, abs=1e-9)
                if terms["mask"][r, t]:
                    assert alpha(span) == pytest.approx(min(1.0, abs(value) / vmax), abs=1e-3)  # colour = value
                top = terms["teacher_topk"]["probs"][r, t]
                assert "teacher top: " in span["data-tip"] and f"{top[0].item():.3f}" in span["data-tip"]


def test_teacher_topk_from_hidden_states_equals_from_logits(tiny, records):
    """With `loss.chunk_size` the module has hidden states, not logits: the alternatives must be the same."""
    from conftest import make_batch

    from lightning_sd.rollout import rollout_on

    model, tok = tiny
    batch = make_batch(tok, records[:2])
    ref = SelfDistillationModule(model, tok, teacher="frozen", loss={"template": "answer_hint", "temperature": 1.1})
    chunked = SelfDistillationModule(model, tok, teacher="frozen",
                                     loss={"template": "answer_hint", "temperature": 1.1, "chunk_size": 5})
    batch.rollout = rollout_on(None, ref, model, batch.prompt_ids, batch.prompt_mask,
                                  SamplingConfig(max_new_tokens=8), seed=0)
    inputs = ref.build_teacher_inputs(batch)
    a = teacher_topk(ref, ref.teacher_forward(batch, inputs), 4)
    b = teacher_topk(chunked, chunked.teacher_forward(batch, inputs), 4)
    assert a["ids"].shape == (2, batch.rollout.completion_ids.size(1), 4)
    torch.testing.assert_close(b["probs"], a["probs"], atol=1e-5, rtol=1e-4)
    assert torch.equal(a["ids"][..., 0], b["ids"][..., 0])
    assert (a["probs"][..., :-1] >= a["probs"][..., 1:]).all() and (a["probs"].sum(-1) <= 1 + 1e-5).all()


def test_progress_bar_counts_optimizer_steps_and_shows_throughput():
    bar = TrainingProgressBar()

    class FakeTrainer:
        max_steps = 40
        callback_metrics = {"train/loss": torch.tensor(0.123456), "train/divergence": torch.tensor(0.5),
                            "train/reward": torch.tensor(0.25), "train/gen_tokens_per_s": torch.tensor(812.7),
                            "train/train_tokens_per_s": torch.tensor(95.2), "train/completion_len": torch.tensor(3.0)}

    bar._trainer = FakeTrainer()
    assert bar.total_train_batches == 40
    assert bar.get_metrics(FakeTrainer(), None) == {"loss": "0.1235", "div": "0.5000", "reward": "0.25",
                                                     "gen tok/s": "813", "train tok/s": "95"}
