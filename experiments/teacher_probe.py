"""Where does each teacher wording disagree with the student? A probe of the teacher contexts, run before
training: the student samples answers to validation problems, then each teacher context scores those same
tokens. A teacher worth distilling disagrees on the tokens that carry the answer (digits) and agrees on the
wording; a teacher that disagrees mostly on the wording teaches its register instead.

    python experiments/teacher_probe.py                          # arithmetic, the calculation format, T 0.3
    python experiments/teacher_probe.py --problems 4 --samples 1 --model tiny   # a smoke run

Per teacher context (forward KL(T||S) per token at the loss temperature 1):
- `kl_digits`, `kl_other`: mean KL on completion tokens with / without a digit; `digit_share` of the total.
- `kl_first`: KL on the first completion token (where an answer-first or register preference shows).
- `p_opens_with_digit`: the teacher's probability that the reply opens with a number (the calculation).
- `advantage_correct` / `advantage_wrong`: mean over rollouts of sum_t log T(y_t) - log S(y_t), for rollouts
  the verifier marks right / wrong (a teacher that knows the answer prefers the right ones).
Writes experiments/results/teacher_probe/results.json and summary.md (with the commit and the machine).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch


import evidence

from lightning_sd.contexts import TEMPLATES
from lightning_sd.data.prompts import format_prompt
from lightning_sd.data.tasks.arithmetic import ArithmeticTask
from lightning_sd.models import load_model

ROOT = Path(__file__).resolve().parents[1]
CALC = "Write the calculation on one line, then finish with 'The answer is' followed by the number."
DEFAULT_TEMPLATES = ["self_critique_v3", "self_critique_format_last", "answer_hint", "answer_note", "solution_note",
                     "demonstration", "demonstration_plain"]


def completion_logprobs(model, prompt_ids: list[int], completion: list[int]) -> torch.Tensor:
    """Log-softmax `[len(completion), V]` of the model at each completion token after `prompt_ids`."""
    ids = torch.tensor([prompt_ids + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1:-1].double()
    return torch.log_softmax(logits, -1)


def p_opens_with_digit(tok, first_logprobs: torch.Tensor) -> float:
    """Probability that a reply opens with a number, from the log-probs `[V]` of its first token (the 50
    likeliest tokens; the rest carry almost no mass)."""
    top = first_logprobs.topk(50)
    return sum(float(lp.exp()) for lp, t in zip(top.values, top.indices) if tok.decode([int(t)]).strip()[:1].isdigit())


def probe(model, tok, records: list[dict], task, templates: list[str], samples: int, temperature: float,
          max_new_tokens: int) -> dict:
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    rows = []
    for i, rec in enumerate(records):
        prompt = encode(format_prompt(tok, rec["prompt"]))
        torch.manual_seed(i)
        out = model.generate(torch.tensor([prompt] * samples), attention_mask=torch.ones(samples, len(prompt),
                             dtype=torch.long), do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                             max_new_tokens=max_new_tokens, pad_token_id=tok.eos_token_id)
        for seq in out[:, len(prompt):].tolist():
            if tok.eos_token_id in seq:
                seq = seq[:seq.index(tok.eos_token_id) + 1]
            text = tok.decode(seq, skip_special_tokens=True)
            student = completion_logprobs(model, prompt, seq)
            digits = torch.tensor([bool(re.search(r"\d", tok.decode([t]))) for t in seq])
            rows.append({"record": rec, "completion": seq, "student": student, "digits": digits,
                         "correct": task.verify(rec, text).reward > 0})
    out: dict = {"student_sampled_accuracy": sum(r["correct"] for r in rows) / len(rows), "rollouts": len(rows),
                 "templates": {}}
    for name in templates:
        kl_d, kl_o, kl_first, adv = [], [], [], {True: [], False: []}
        opens_digit = []
        for row in rows:
            teacher_prompt = encode(format_prompt(tok, TEMPLATES.get(name, name).format(**row["record"])))
            teacher = completion_logprobs(model, teacher_prompt, row["completion"])
            kl = (teacher.exp() * (teacher - row["student"])).sum(-1)
            kl_d += kl[row["digits"]].tolist()
            kl_o += kl[~row["digits"]].tolist()
            kl_first.append(float(kl[0]))
            idx = torch.tensor(row["completion"])[:, None]
            adv[row["correct"]].append(float((teacher.gather(1, idx) - row["student"].gather(1, idx)).sum()))
            opens_digit.append(p_opens_with_digit(tok, teacher[0]))
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        total = sum(kl_d) + sum(kl_o)
        out["templates"][name] = {
            "kl_digits": mean(kl_d), "kl_other": mean(kl_o), "digit_share": sum(kl_d) / total if total else None,
            "kl_first": mean(kl_first), "p_opens_with_digit": mean(opens_digit),
            "advantage_correct": mean(adv[True]), "advantage_wrong": mean(adv[False])}
        print(f"[teacher_probe] {name}: {out['templates'][name]}", flush=True)
    out["student_p_opens_with_digit"] = sum(p_opens_with_digit(tok, r["student"][0]) for r in rows) / len(rows)
    return out


def markdown(result: dict) -> str:
    fmt = lambda x, d=3: "" if x is None else f"{x:.{d}f}"  # noqa: E731
    lines = [f"Student sampled accuracy {result['student_sampled_accuracy']:.3f} over {result['rollouts']} rollouts; "
             f"the student opens with a number with probability {result['student_p_opens_with_digit']:.2f}.", "",
             "| teacher context | KL on digits | KL elsewhere | digit share | KL first token | P(opens with a number) "
             "| advantage, right rollouts | advantage, wrong rollouts |", "|---|---|---|---|---|---|---|---|"]
    for name, m in result["templates"].items():
        lines.append(f"| `{name}` | {fmt(m['kl_digits'])} | {fmt(m['kl_other'])} | {fmt(m['digit_share'], 2)} | "
                     f"{fmt(m['kl_first'])} | {fmt(m['p_opens_with_digit'], 2)} | {fmt(m['advantage_correct'], 2)} | "
                     f"{fmt(m['advantage_wrong'], 2)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--problems", type=int, default=24)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.3)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--instruction", default=CALC)
    ap.add_argument("--templates", nargs="+", default=DEFAULT_TEMPLATES)
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "teacher_probe"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    model.eval()
    task = ArithmeticTask(n_steps=1, max_operand=50, instruction=args.instruction)
    records = task.records("val", args.problems)
    t0 = time.perf_counter()
    result = probe(model, tok, records, task, args.templates, args.samples, args.temperature, args.max_new_tokens)
    result.update({"config": vars(args), "split": "val", "git_commit": evidence.git_commit(),
                   "machine": evidence.machine(), "seconds": time.perf_counter() - t0})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
