"""Model options: a built-in external teacher needs no folder, `model.chat_template` (and the error that names it
when a tokenizer has none), `model.gguf_file` given as a file path."""

from __future__ import annotations

import pytest
from test_config import TINY, compose_cfg

from lightning_sd.config import ConfigError, validate_config
from lightning_sd.models import CHATML_TEMPLATE, ModelLoadError, load_model, require_chat_template, set_chat_template


def test_a_built_in_external_teacher_needs_no_name_or_path(tmp_path):
    from lightning_sd.build import build_run
    from lightning_sd.teachers import ExternalTeacher

    cfg = compose_cfg(TINY + ["teacher=external", "teacher.model.name=tiny", "teacher.model.tokenizer=byte",
                              "+teacher.model.seed=3"])
    run = build_run(cfg, run_dir=str(tmp_path))
    assert isinstance(run.module.teacher, ExternalTeacher)
    with pytest.raises(ConfigError, match="teacher.model.name=hf needs teacher.model.name_or_path"):
        validate_config(compose_cfg(TINY + ["teacher=external"]))
    with pytest.raises(ConfigError, match="teacher.model.name='tinyy' is not one of"):
        validate_config(compose_cfg(TINY + ["teacher=external", "teacher.model.name=tinyy"]))


def test_set_chat_template_options(tmp_path):
    _, tok = load_model("tiny")
    set_chat_template(tok, "plain")
    assert tok.chat_template is None
    set_chat_template(tok, "chatml")
    assert tok.chat_template == CHATML_TEMPLATE
    jinja = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    set_chat_template(tok, jinja)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user] hi\n"
    path = tmp_path / "template.jinja"
    path.write_text("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}")
    set_chat_template(tok, str(path))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<user> hi\n"
    with pytest.raises(ModelLoadError, match="model.chat_template='chatmll' is not a file, a Jinja template"):
        set_chat_template(tok, "chatmll")
    with pytest.raises(ModelLoadError, match="model.chat_template: the template does not render"):
        set_chat_template(tok, "{{ messages[0]['content'] }")


def test_a_tokenizer_without_chat_template_stops_the_run_naming_model_chat_template(tmp_path):
    from lightning_sd.build import build_run

    model, tok = load_model("tiny")
    tok.chat_template = None
    folder = tmp_path / "no_template"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    with pytest.raises(ModelLoadError, match="has no chat template.*model.chat_template=<a Jinja template"):
        require_chat_template(load_model("hf", name_or_path=str(folder))[1], None)
    base = [o for o in TINY if not o.startswith("model=")] + ["model=hf", f"model.name_or_path={folder}"]
    with pytest.raises(ModelLoadError, match="model.chat_template=plain for plain-text prompts"):
        build_run(compose_cfg(base), run_dir=str(tmp_path / "run"))
    run = build_run(compose_cfg(base + ["model.chat_template=plain"]), run_dir=str(tmp_path / "run"))
    run.datamodule.setup("fit")
    assert next(iter(run.datamodule.train_dataloader())).prompt_text[0].endswith("\n")
    run = build_run(compose_cfg(base + ["model.chat_template=chatml"]), run_dir=str(tmp_path / "run"))
    run.datamodule.setup("fit")
    assert next(iter(run.datamodule.train_dataloader())).prompt_text[0].startswith("<|im_start|>user")


def test_gguf_file_errors_name_the_option(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"model.gguf_file='b.gguf' is not a file in .*GGUF files there: \['a.gguf'\]"):
        load_model("hf", name_or_path=str(tmp_path), gguf_file="b.gguf")
    with pytest.raises(ModelLoadError, match="model=hf needs model.name_or_path"):
        load_model("hf", gguf_file=str(tmp_path / "missing.gguf"))
