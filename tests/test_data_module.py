"""PromptDataModule: sources, batch format, seeded order, and exact resume under a real Trainer."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from _tokenizers import byte_tokenizer, load_smollm2_tokenizer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_sd.batch import StepBatch
from lightning_sd.data.datamodule import PromptDataModule
from lightning_sd.data.records import DataError, save_jsonl
from lightning_sd.data.sampler import ResumableSampler


def tiny(**kwargs) -> PromptDataModule:
    kwargs.setdefault("records", [{"prompt": f"question {i}", "answer": str(i)} for i in range(10)])
    return PromptDataModule(byte_tokenizer(pad=True), batch_size=kwargs.pop("batch_size", 3), **kwargs)


def ids_of(loader) -> list[list[str]]:
    return [[r["id"] for r in b.records] for b in loader]


def test_batch_format_with_task_and_chat_template():
    tok = load_smollm2_tokenizer()
    dm = PromptDataModule(tok, task="arithmetic", task_kwargs={"n_steps": 1}, n_train=10, n_eval=5, batch_size=4,
                          eval_batch_size=5)
    dm.setup("fit")
    assert dm.task.name == "arithmetic" and len(dm.train_records) == 10 and len(dm.eval_records) == 5
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, StepBatch) and batch.rollout is None and batch.on_policy is None  # the collator's part
    b, p = batch.prompt_ids.shape
    assert b == 4 and batch.prompt_mask.shape == (4, p) and batch.prompt_ids.dtype == torch.long
    assert len(batch.records) == len(batch.prompt_text) == 4
    for rec, text, ids, mask in zip(batch.records, batch.prompt_text, batch.prompt_ids, batch.prompt_mask):
        assert text.endswith("<|im_start|>assistant\n") and rec["prompt"] in text
        assert tok.decode(ids[mask.bool()]) == text and mask[-1] == 1  # left-padded
        assert "solution" in rec and "answer" in rec
    val = list(dm.val_dataloader())
    assert len(val) == 1 and [r["id"] for r in val[0].records] == [r["id"] for r in dm.eval_records]


def test_exactly_one_source_and_option_errors(tmp_path):
    tok = byte_tokenizer(pad=True)
    with pytest.raises(DataError, match=r"exactly one train source: task=, train_file=, records= or hf_dataset= \(got"):
        PromptDataModule(tok)
    with pytest.raises(DataError, match=r"got \['task', 'records'\]"):
        PromptDataModule(tok, task="arithmetic", records=[{"prompt": "a"}])
    with pytest.raises(DataError, match="unknown task 'nope'; built-in tasks"):
        PromptDataModule(tok, task="nope")
    with pytest.raises(DataError, match=r"task 'arithmetic' has no option\(s\) \['steps'\]"):
        PromptDataModule(tok, task="arithmetic", task_kwargs={"steps": 2})
    with pytest.raises(DataError, match="truncation='middle'"):
        PromptDataModule(tok, task="arithmetic", truncation="middle")
    with pytest.raises(DataError, match="eval_file= or eval_records=, not both"):
        PromptDataModule(tok, task="arithmetic", eval_file="x", eval_records=[])
    with pytest.raises(DataError, match=r"records row 1: missing required field 'prompt'"):
        tiny(records=[{"prompt": "a"}, {"text": "b"}]).setup()


def test_sources_file_list_and_hf_like(tmp_path):
    rows = [{"prompt": f"p{i}", "solution": "s"} for i in range(5)]
    train, evals = save_jsonl(rows, tmp_path / "train.jsonl"), save_jsonl(rows[:2], tmp_path / "eval.jsonl")
    dm = PromptDataModule(byte_tokenizer(pad=True), train_file=str(train), eval_file=str(evals), batch_size=2)
    with pytest.warns(UserWarning, match="2 eval prompts also appear in the train records"):
        dm.setup()
    assert [r["id"] for r in dm.train_records] == [f"train.jsonl:{i}" for i in range(1, 6)] and dm.task is None
    assert len(dm.eval_records) == 2

    class FakeDataset:  # what a `datasets.Dataset` looks like to the data module: an iterable of dicts
        def __iter__(self):
            return iter(rows)

    dm = tiny(records=None, hf_dataset=FakeDataset(), n_train=3)
    with pytest.warns(UserWarning, match=r"using the first 3 of 5 records of hf_dataset \(n_train=3\)"):
        dm.setup()
    assert [r["id"] for r in dm.train_records] == ["hf_dataset:0", "hf_dataset:1", "hf_dataset:2"]
    assert dm.val_dataloader() == []
    with pytest.raises(DataError, match="hf_dataset row 0 is a str, not a dict"):
        tiny(records=None, hf_dataset={"train": rows}).setup()
    assert "id" not in rows[0]  # the caller's dicts are not modified


def test_prompt_length_checked_once_in_setup():
    long = [{"prompt": "x" * 50, "id": "long"}, {"prompt": "short"}]
    with pytest.raises(DataError, match=r"records row 0 \(id 'long'\) has 51 prompt tokens, more than max_prompt"):
        tiny(records=long, max_prompt_length=20, truncation="error").setup()
    dm = tiny(records=long, max_prompt_length=20)
    with pytest.warns(UserWarning, match=r"1 of 2 prompts of records are longer than max_prompt_length=20"):
        dm.setup()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning per batch
        batch = next(iter(dm.val_dataloader() or dm.train_dataloader()))
    assert batch.prompt_ids.shape[1] == 20


def test_pad_token_falls_back_to_eos():
    dm = PromptDataModule(byte_tokenizer(eos=True), records=[{"prompt": "a"}, {"prompt": "abc"}], batch_size=2)
    with pytest.warns(UserWarning, match="no pad token; using its eos token"):
        dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch.prompt_ids[:, 0].tolist().count(dm.tokenizer.eos_token_id) == 1


def test_order_is_seeded_and_epochs_differ():
    a, b, c = tiny(seed=1), tiny(seed=1), tiny(seed=2)
    la, lb, lc = a.train_dataloader(), b.train_dataloader(), c.train_dataloader()
    assert ids_of(la) == ids_of(lb) != ids_of(lc)
    first = ids_of(la)
    assert sorted(sum(first, [])) == sorted(r["id"] for r in a.train_records)
    assert [len(x) for x in first] == [3, 3, 3, 1]
    la.sampler.set_epoch(1)
    assert ids_of(la) != first


def test_workers_give_the_same_batches():
    assert ids_of(tiny(num_workers=1).train_dataloader()) == ids_of(tiny().train_dataloader())


def test_sampler_shards_by_rank_and_skips():
    shards = [ResumableSampler(10, batch_size=2, seed=0, num_replicas=3, rank=r) for r in range(3)]
    got = [list(s) for s in shards]
    assert all(len(g) == 4 for g in got) and set(sum(got, [])) == set(range(10))
    s = ResumableSampler(10, batch_size=2, seed=0)
    full = list(s)
    s.resume(0, 2)
    assert list(s) == full[4:] and len(s) == 10 and s.batches_yielded == 5
    s.resume(0, 2)
    s.set_epoch(1)  # a resume for another epoch is dropped
    assert len(list(s)) == 10


def test_state_dict_without_trainer_counts_yielded_batches():
    dm = tiny()
    loader = dm.train_dataloader()
    it = iter(loader)
    seen = [next(it), next(it)]
    state = dm.state_dict()
    assert state["epoch"] == 0 and state["batches_done"] == 2
    resumed = tiny()
    resumed.setup()
    resumed.load_state_dict(state)
    rest = ids_of(resumed.train_dataloader())
    assert [[r["id"] for r in b.records] for b in seen] + rest == ids_of(tiny().train_dataloader())
    other = tiny(seed=5)
    other.setup()
    with pytest.warns(UserWarning, match="different data settings.*seed"):
        other.load_state_dict(state)


class Recorder(L.LightningModule):
    """Records the ids of every train batch it sees."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append([r["id"] for r in batch.records])
        return (self.w - batch.prompt_mask.float().mean()).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path, max_steps: int, ckpt_path=None, every: bool = False) -> list[list[str]]:
    model = Recorder()
    every_step = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    callbacks = [every_step] if every else []
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=every, callbacks=callbacks,
                        limit_val_batches=0, default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=tiny(), ckpt_path=ckpt_path)
    return model.seen


@pytest.mark.parametrize("stop", [2, 4, 6])  # mid epoch 0, end of epoch 0 (4 batches per epoch), mid epoch 1
def test_resume_continues_with_exactly_the_same_batches(tmp_path, stop):
    full = fit(tmp_path / "full", 10)
    assert len(full) == 10 and full[:4] != full[4:8]  # two epochs in a different order
    first = fit(tmp_path / "cut", stop, every=True)
    assert first == full[:stop]
    resumed = fit(tmp_path / "resumed", 10, ckpt_path=str(tmp_path / "cut" / f"step={stop}.ckpt"))
    assert resumed == full[stop:]
    state = torch.load(tmp_path / "cut" / f"step={stop}.ckpt", weights_only=False)["PromptDataModule"]
    assert (state["epoch"], state["batches_done"]) == ((stop - 1) // 4, (stop - 1) % 4 + 1)
