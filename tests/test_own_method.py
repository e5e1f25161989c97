"""A new method is one Python file plus one YAML, outside the package: the worked example of docs/api.md ("Your
own method"), read from the doc, written to a temporary folder, selected with `loss=<yaml>` and trained two steps on
the tiny model."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch import Callback, Trainer, seed_everything

from lightning_sd.build import build_run
from lightning_sd.methods import Step, method_for
from lightning_sd.objectives import LossConfig

ROOT = Path(__file__).resolve().parents[1]



def _example(language: str) -> str:
    """The `language` code block of docs/api.md's "Your own method" section."""
    doc = (ROOT / "docs" / "api.md").read_text()
    section = doc[doc.index("## Your own method"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(rf"```{language}\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 1, f"docs/api.md, Your own method: expected one {language} block, found {len(blocks)}"
    return blocks[0]


METHOD = _example("python")  # the method's file
YAML = _example("yaml")  # its loss option


@pytest.fixture
def own_method(tmp_path, monkeypatch):
    code = tmp_path / "code"
    (code / "my_methods.py").parent.mkdir()
    (code / "my_methods.py").write_text(textwrap.dedent(METHOD))
    (tmp_path / "conf" / "loss").mkdir(parents=True)
    (tmp_path / "conf" / "loss" / "late_tokens.yaml").write_text(textwrap.dedent(YAML))
    monkeypatch.syspath_prepend(str(code))
    return tmp_path


class Losses(Callback):
    def __init__(self):
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.values.append(float(loss.detach()))


def test_a_method_in_one_file_and_one_yaml_trains(own_method, tmp_path):
    overrides = ["model=tiny", "data=arithmetic", "loss=late_tokens", "loss.power=3",
                 f"hydra.searchpath=[file://{own_method / 'conf'}]",
                 "data.n_train=8", "data.n_eval=4", "data.batch_size=4", "generation.n=1",
                 "generation.max_new_tokens=8", "trainer.max_steps=2", "logger=none",
                 "trainer.enable_checkpointing=false", "trainer.enable_progress_bar=false",
                 "callbacks.token_view_every=null", "eval.before=false", "eval.after=false"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    seed_everything(cfg.seed, workers=True)
    run = build_run(cfg, run_dir=str(tmp_path / "run"))
    assert type(run.module.method).__name__ == "LateTokens" and run.module.needs_teacher
    assert run.module.loss_cfg.temperature == 1.1
    assert run.module.method.options.power == 3.0 and run.module.method.options.template == "self_critique_v3"
    losses = Losses()
    trainer = Trainer(**run.trainer_kwargs, callbacks=run.callbacks + [losses], logger=False,
                      enable_model_summary=False)
    trainer.fit(run.module, datamodule=run.datamodule)
    assert trainer.global_step == 2 and len(losses.values) == 2
    assert all(torch.isfinite(torch.tensor(losses.values)))


def test_the_weight_changes_the_terms_and_nothing_else(own_method):
    from my_methods import LateTokens

    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    per_token = torch.ones(2, 4)
    step = Step(rollout=None, records=[{}], rewards=None, mask=mask, row_mask=torch.tensor([True, True]),
                logprobs=lambda: None, distillation=lambda m: per_token)
    loss = LossConfig.from_dict({"name": "my_methods.LateTokens", "template": "self_critique_v3"})
    method = method_for(loss)
    assert isinstance(method, LateTokens)
    terms = method.terms(step)
    assert torch.equal(terms.mask, mask)
    assert torch.allclose(terms.per_token[0], torch.tensor([0.25, 0.5, 0.75, 1.0]))
    assert torch.allclose(terms.per_token[1, :2], torch.tensor([0.5, 1.0]))
    squared = method_for(LossConfig.from_dict({"name": "my_methods.LateTokens", "power": 2})).terms(step)
    assert torch.allclose(squared.per_token[0], torch.tensor([0.25, 0.5, 0.75, 1.0]) ** 2)


def test_its_own_option_is_checked_and_belongs_to_it_alone(own_method):
    with pytest.raises(ValueError, match="loss.power must be > 0"):
        LossConfig.from_dict({"name": "my_methods.LateTokens", "power": 0})
    with pytest.raises(ValueError, match="loss.power: unknown key"):  # not an option of a built-in method
        LossConfig.from_dict({"name": "self_critique", "power": 2.0})


def test_a_name_that_is_no_method_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="not one of .*self_critique"):
        LossConfig.from_dict({"name": "no_such_method"})
    with pytest.raises(ValueError, match="not a subclass of lightning_sd.methods.Method"):
        LossConfig.from_dict({"name": "torch.nn.Linear"})
