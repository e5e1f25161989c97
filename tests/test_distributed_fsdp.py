"""FSDP (torch FSDP1, as Lightning's FSDPStrategy uses it) on CPU with 2 gloo processes. Lightning refuses FSDP
on CPU, so the module is wrapped here the way `build_strategy` configures it (`fsdp_wrap_policy`,
`use_orig_params=True`); `experiments/gpu_check.py` runs the Lightning path on a GPU.

Checked: weights gathered once per rollout (not per decode step) and the rollout equals the unsharded
model's; tied embeddings stay tied; the EMA teacher update works on the shards; the LoRA EMA adapter update
works under FSDP. This file is also the worker script (`python tests/test_distributed_fsdp.py OUT_DIR`).
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve()
MAX_NEW = 5


class Holder(nn.Module):
    """Stands in for the LightningModule: a student and a teacher policy under one FSDP root."""

    def __init__(self, student, teacher):
        super().__init__()
        self.student, self.teacher = student, teacher

    def forward(self, **kw):
        return self.student(**kw)


def _wrap(holder, student):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from lightning_sd.distributed import fsdp_wrap_policy

    return FSDP(holder, auto_wrap_policy=ModuleWrapPolicy(fsdp_wrap_policy(student)), use_orig_params=True,
                device_id=torch.device("cpu"))


def _worker(out: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp._flat_param import FlatParamHandle

    from lightning_sd.data.prompts import encode_prompts, format_prompt
    from lightning_sd.distributed import fsdp_gathered, fsdp_units
    from lightning_sd.lora import adapter_parameters, apply_lora
    from lightning_sd.models import load_model
    from lightning_sd.sampling import SamplingConfig, sample
    from lightning_sd.teachers import EmaTeacher

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result: dict = {}

    gathers = {"n": 0}
    original = FlatParamHandle._all_gather_flat_param

    def counting(self, *a, **k):
        gathers["n"] += 1
        return original(self, *a, **k)

    FlatParamHandle._all_gather_flat_param = counting

    student, tok = load_model("tiny", seed=0)
    reference = copy.deepcopy(student).eval()
    teacher = EmaTeacher(student, rate=0.25)
    root = _wrap(Holder(student, teacher), student)
    st = root.student
    result["student_is_unit"] = isinstance(st, FSDP)
    result["student_units"] = len(fsdp_units(st))

    texts = [format_prompt(tok, p) for p in (["Hi", "What is 2+2?"] if rank == 0 else ["A longer prompt here", "x"])]
    enc = encode_prompts(tok, texts, pad_token_id=tok.pad_token_id)
    cfg = SamplingConfig(max_new_tokens=MAX_NEW, do_sample=False)

    def keep_going(local_done):
        flag = torch.tensor([0 if local_done else 1])
        dist.all_reduce(flag)
        return bool(flag.item())

    def decode(model):
        return sample(model, enc.ids, enc.mask, cfg, pad_token_id=tok.pad_token_id, stop_token_ids=[tok.eos_token_id],
                      keep_going=keep_going)

    # 1. gathered once per rollout, identical to the unsharded model
    with torch.no_grad():
        root(input_ids=enc.ids[:, :2])  # a first forward initialises FSDP's lazy state, as training would
        gathers["n"] = 0
        st.eval()
        with fsdp_gathered(root, st) as net:
            result["tied_inside"] = net.lm_head.weight.data_ptr() == net.model.embed_tokens.weight.data_ptr()
            result["full_inside"] = list(net.model.embed_tokens.weight.shape) == [len(tok), 64]
            rollout = decode(net)
        result["restored"] = isinstance(st, FSDP) and all(isinstance(m, FSDP) for m in st.model.layers)
        result["gathers_once"] = gathers["n"]
        gathers["n"] = 0
        per_step = decode(st)
        result["gathers_per_step"] = gathers["n"]
        expected = decode(reference)
    result["same_as_unsharded"] = bool(torch.equal(rollout.completion_ids, expected.completion_ids))
    result["same_per_step"] = bool(torch.equal(per_step.completion_ids, expected.completion_ids))
    result["decode_steps"] = rollout.completion_ids.size(1)

    # 2. EMA on shards: student moves by +0.5 everywhere, teacher <- 0.75 t + 0.25 s
    with FSDP.summon_full_params(st, writeback=True):
        with torch.no_grad():
            for p in st.parameters():
                p.add_(0.5)
    teacher.after_optimizer_step(st)
    with FSDP.summon_full_params(teacher.model):
        err = max(float((t - (r + 0.125)).abs().max())
                  for t, r in zip(teacher.model.parameters(), reference.parameters()))
    result["ema_shard_err"] = err

    # 3. LoRA EMA adapter under FSDP (the two adapters' shards do not line up: per-unit gather)
    base, _ = load_model("tiny", seed=1)
    torch.manual_seed(0)  # LoRA's random init must agree across ranks (train.py seeds every rank alike)
    lora = apply_lora(base, {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    lteacher = EmaTeacher(lora, rate=0.5)
    with torch.no_grad():
        for i, (_, p) in enumerate(adapter_parameters(lora, "default")):
            p.fill_(0.01 * (i + 1))
        ema0 = [p.detach().clone() for _, p in adapter_parameters(lora, "ema")]
        default = [p.detach().clone() for _, p in adapter_parameters(lora, "default")]
    lroot = _wrap(Holder(lora, lteacher), lora)
    with torch.no_grad():
        lroot(input_ids=enc.ids[:, :2])
    lteacher.after_optimizer_step(lroot.student)
    with FSDP.summon_full_params(lroot):
        ema1 = [p.detach().clone() for _, p in adapter_parameters(lroot.student, "ema")]
        default1 = [p.detach().clone() for _, p in adapter_parameters(lroot.student, "default")]
    result["lora_ema_err"] = max(float((e1 - (0.5 * e0 + 0.5 * d)).abs().max()) for e1, e0, d in zip(ema1, ema0, default))
    result["lora_default_unchanged"] = all(torch.equal(a, b) for a, b in zip(default1, default))
    (out / f"fsdp_rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp_cpu_gather_once_tied_embeddings_and_ema_on_shards(tmp_path):
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        procs.append(subprocess.Popen([sys.executable, str(HERE), str(tmp_path)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-6000:]
    for rank in (0, 1):
        r = json.loads((tmp_path / f"fsdp_rank{rank}.json").read_text())
        assert r["student_is_unit"] and r["student_units"] == 3  # the LM + 2 decoder layers
        assert r["same_as_unsharded"] and r["same_per_step"]
        assert r["decode_steps"] == MAX_NEW
        assert r["gathers_once"] == r["student_units"]  # one all-gather per unit for the whole rollout
        assert r["gathers_per_step"] >= MAX_NEW * r["student_units"]  # what gathering once avoids
        assert r["tied_inside"] and r["full_inside"] and r["restored"]
        assert r["ema_shard_err"] < 1e-6
        assert r["lora_ema_err"] < 1e-7 and r["lora_default_unchanged"]


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
    # the results are written; skip the interpreter's teardown, where the process group's C++ threads can abort
    # the process ("terminate called without an active exception") after everything checked has finished
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
