"""DDP on CPU (2 processes, gloo), launched by Lightning itself from a subprocess: this file is also the worker
script (`python tests/test_distributed_ddp.py MODE OUT_DIR`; Lightning re-runs it for rank 1).

- uneven: rank 0's completions stop at EOS at once, rank 1's run to the limit; 3 training steps must finish,
  and both ranks must have decoded the same number of steps (lock-step).
- grad: one optimizer step with fixed rollouts of uneven lengths; the gradient (SGD, lr=1: weight change) must
  be the same for batch 8 on one process, 2 accumulated micro-batches of 4, and 2 ranks x 4.
- empty: rank 0's rows all have no teacher context (no signal), rank 1's do: both ranks must still step, by
  rank 1's gradient alone (no rank may skip a step the other takes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()
MAX_NEW = 6
LENGTHS = [1, 2, 3, 4, 9, 10, 11, 12]  # completion tokens per record: rank 0 gets 10 tokens, rank 1 gets 42
RECORDS = [{"id": str(i), "prompt": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1),
            "solution": f"{i} + {i + 1} = {2 * i + 1}."} for i in range(8)]


def _batch(tokenizer, records):
    from lightning_sd.data.datamodule import prompt_batch

    return prompt_batch(tokenizer, records)


class _Batches(torch.utils.data.Dataset):
    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


def _loader(batches):
    return torch.utils.data.DataLoader(_Batches(batches), batch_size=None, shuffle=False)


def _fixed_rollout(tokenizer, batch):
    """A deterministic rollout: record i's completion is LENGTHS[i] tokens (no stop token), right-padded."""
    from lightning_sd.sampling import Rollout

    ids = [int(r["id"]) for r in batch.records]
    width = max(LENGTHS[i] for i in ids)
    g = torch.Generator().manual_seed(1234)
    table = torch.randint(0, 250, (8, max(LENGTHS)), generator=g)  # byte ids; EOS/pad are >= 256
    completion = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for row, i in enumerate(ids):
        completion[row, : LENGTHS[i]] = table[i, : LENGTHS[i]]
        mask[row, : LENGTHS[i]] = 1
    return Rollout(prompt_ids=batch.prompt_ids, prompt_mask=batch.prompt_mask.long(), completion_ids=completion,
                   completion_mask=mask, logprobs=torch.zeros(len(ids), width), truncated=torch.ones(len(ids), dtype=torch.bool),
                   prompt_index=torch.arange(len(ids)))


def _module(student, tokenizer, teacher="frozen", **kw):
    from lightning_sd.module import SelfDistillationModule

    return SelfDistillationModule(student, tokenizer, teacher=teacher, loss={"name": "distill", "template": "answer_hint"},
                                  optimizer={"name": "sgd", "lr": 1.0}, **kw)


def _trainer(**kw):
    from lightning.pytorch import Trainer

    return Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0, use_distributed_sampler=False, **kw)


def hint_for_upper_half(record, row):
    """A teacher context for records 4-7 only: rows of records 0-3 are masked (no signal)."""
    return f"{record['prompt']} (answer: {record['answer']})" if int(record["id"]) >= 4 else None


def one_step_weights(batches, accumulate: int = 1, context=None, **trainer_kw) -> tuple[dict, dict]:
    """(initial, after one optimizer step) student weights for fixed rollouts over `batches`."""
    from lightning.pytorch import Callback

    from lightning_sd.models import load_model

    student, tok = load_model("tiny", seed=0)
    module = _module(student, tok, **({"context": context} if context else {}))
    before = {k: v.detach().clone() for k, v in student.state_dict().items()}

    class Fixed(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            batch.rollout = _fixed_rollout(tok, batch)

    trainer = _trainer(max_steps=1, accumulate_grad_batches=accumulate, callbacks=[Fixed()], **trainer_kw)
    trainer.fit(module, _loader(batches))
    return before, {k: v.detach().clone() for k, v in student.state_dict().items()}


# ------------------------------------------------------------------------------------------------ workers


def _worker_grad(out: Path) -> None:
    from lightning_sd.models import load_model

    tok = load_model("tiny", seed=0)[1]
    rank = int(os.environ.get("LOCAL_RANK", 0))
    batches = [_batch(tok, RECORDS[4 * rank: 4 * rank + 4])]
    before, after = one_step_weights(batches, accelerator="cpu", devices=2, strategy="ddp")
    if rank == 0:
        torch.save({"before": before, "after": after}, out / "ddp_weights.pt")


def _worker_empty(out: Path) -> None:
    from lightning_sd.models import load_model

    tok = load_model("tiny", seed=0)[1]
    rank = int(os.environ.get("LOCAL_RANK", 0))
    batches = [_batch(tok, RECORDS[4 * rank: 4 * rank + 4])]
    before, after = one_step_weights(batches, context=hint_for_upper_half, accelerator="cpu", devices=2,
                                     strategy="ddp")
    torch.save({"before": before, "after": after}, out / f"empty_rank{rank}.pt")


def _worker_uneven(out: Path) -> None:
    from lightning.pytorch import Callback

    from lightning_sd.callbacks.generation import OnPolicyGeneration
    from lightning_sd.models import load_model

    student, tok = load_model("tiny", seed=0)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    eos = tok.eos_token_id

    def bias_eos(module, inputs, output):  # rank 0: EOS at once; rank 1: never EOS (runs to the limit)
        output = output.clone()
        output[..., eos] = 1e4 if rank == 0 else -1e4
        return output

    student.lm_head.register_forward_hook(bias_eos)
    module = _module(student, tok, teacher="ema", teacher_kwargs={"rate": 0.5})
    module.optimizer_cfg.lr = 1e-3
    seen = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            r = batch.rollout
            seen.append({"decode_steps": r.completion_ids.size(1), "lengths": r.completion_mask.sum(-1).tolist(),
                         "global_step": trainer.global_step})

    batches = [_batch(tok, RECORDS[4 * rank + (s % 2): 4 * rank + (s % 2) + 2]) for s in range(3)]
    gen = OnPolicyGeneration({"max_new_tokens": MAX_NEW, "do_sample": True, "seed": 7})
    trainer = _trainer(max_steps=3, accelerator="cpu", devices=2, strategy="ddp", callbacks=[gen, Record()])
    trainer.fit(module, _loader(batches))
    (out / f"uneven_rank{rank}.json").write_text(json.dumps({"seen": seen, "world_size": trainer.world_size}))


def _launch(mode: str, out: Path, timeout: float = 300.0) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    for k in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.Popen([sys.executable, str(HERE), mode, str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        log, _ = proc.communicate()
        pytest.fail(f"DDP {mode} run did not finish in {timeout:.0f} s (hang?):\n{log[-4000:]}")
    assert proc.returncode == 0, f"DDP {mode} run failed:\n{log[-6000:]}"


# ------------------------------------------------------------------------------------------------ tests


def test_ddp_uneven_eos_trains_three_steps_in_lock_step(tmp_path):
    _launch("uneven", tmp_path)
    ranks = [json.loads((tmp_path / f"uneven_rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for r in ranks:
        assert [s["global_step"] for s in r["seen"]] == [1, 2, 3]
    # rank 0 stopped at EOS (1 token), rank 1 ran to the limit...
    assert all(length == 1 for s in ranks[0]["seen"] for length in s["lengths"])
    assert all(length == MAX_NEW for s in ranks[1]["seen"] for length in s["lengths"])
    # ...and rank 0 kept decoding with rank 1 (same number of decode steps on both ranks, every step)
    assert [s["decode_steps"] for s in ranks[0]["seen"]] == [MAX_NEW] * 3
    assert [s["decode_steps"] for s in ranks[1]["seen"]] == [MAX_NEW] * 3


def test_gradient_is_independent_of_batch_split(tmp_path):
    from lightning_sd.models import load_model

    tok = load_model("tiny", seed=0)[1]
    full = [_batch(tok, RECORDS)]
    halves = [_batch(tok, RECORDS[:4]), _batch(tok, RECORDS[4:])]
    before, after_full = one_step_weights(full, accelerator="cpu", devices=1)
    _, after_accum = one_step_weights(halves, accumulate=2, accelerator="cpu", devices=1)
    _launch("grad", tmp_path)
    ddp = torch.load(tmp_path / "ddp_weights.pt")
    grad = {k: before[k] - after_full[k] for k in before}
    assert max(float(g.abs().max()) for g in grad.values()) > 1e-3  # a real update happened
    for name in before:
        assert torch.equal(ddp["before"][name], before[name])
        torch.testing.assert_close(before[name] - after_accum[name], grad[name], rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(ddp["before"][name] - ddp["after"][name], grad[name], rtol=0, atol=1e-6, msg=name)
    # the split matters for a naive per-micro-batch token mean: the test would catch it
    _, after_a = one_step_weights(halves[:1], accelerator="cpu", devices=1)
    _, after_b = one_step_weights(halves[1:], accelerator="cpu", devices=1)
    naive = {k: ((before[k] - after_a[k]) + (before[k] - after_b[k])) / 2 for k in before}
    assert max(float((naive[k] - grad[k]).abs().max()) for k in before) > 1e-4


def test_a_rank_without_signal_still_steps_with_the_other(tmp_path):
    """Rank 0's rows carry no signal, rank 1's do: the step is empty only when the global count is zero, so both
    ranks step, by exactly the single-process update on rank 1's batch (a rank-local skip would desynchronize
    the replicas and hang or diverge)."""
    from lightning_sd.models import load_model

    tok = load_model("tiny", seed=0)[1]
    before, after_upper = one_step_weights([_batch(tok, RECORDS[4:])], context=hint_for_upper_half,
                                           accelerator="cpu", devices=1)
    _launch("empty", tmp_path)
    ranks = [torch.load(tmp_path / f"empty_rank{r}.pt") for r in (0, 1)]
    assert max(float((before[k] - after_upper[k]).abs().max()) for k in before) > 1e-3  # a real update
    for name in before:
        for r in ranks:
            torch.testing.assert_close(r["after"][name], after_upper[name], rtol=0, atol=1e-6, msg=name)


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    {"grad": _worker_grad, "uneven": _worker_uneven, "empty": _worker_empty}[mode](out_dir)
