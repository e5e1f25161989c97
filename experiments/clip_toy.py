"""Toy: what the per-entry clip does to one token's student distribution trained toward a teacher.

One token, a vocabulary of 50 entries. The teacher puts most of its mass on the answer (entry 0) and a little
on four "style" entries; the student puts little on the answer and most on the style entries. The student's
logits themselves are the parameters, trained for a fixed number of steps on the forward KL(T||S) with

- no clip,
- the value clip (`entry_clip_mode="value"`, OPSD's clip: each entry's term clamped from above),
- the gradient clip (`entry_clip_mode="gradient"`: each entry's gradient clamped to [-c, c]),

with plain SGD and with Adam. It prints a markdown table: the student's final probability of the teacher's
answer, the final unclipped KL and the final logged loss (what `per_token_divergence` returns).

Usage: python experiments/clip_toy.py [--steps 200] [--vocab 50]
Deterministic (no random numbers); runs in seconds on a CPU.
"""

from __future__ import annotations

import argparse
import math

import torch


from lightning_sd.losses import per_token_divergence

ANSWER = 0
STYLE = (1, 2, 3, 4)


def distributions(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) probabilities over `vocab` entries: answer, style entries, and the rest."""
    rest = vocab - 1 - len(STYLE)

    def build(answer: float, style: float) -> torch.Tensor:
        p = torch.full((vocab,), (1.0 - answer - style * len(STYLE)) / rest, dtype=torch.float64)
        p[ANSWER] = answer
        p[list(STYLE)] = style
        return p

    return build(answer=0.07, style=0.15), build(answer=0.9, style=0.015)


def train(student: torch.Tensor, teacher: torch.Tensor, optimizer: str, steps: int, **clip) -> dict:
    logits = student.log().clone().requires_grad_(True)
    target = teacher.log()[None]
    opt = torch.optim.SGD([logits], lr=1.0) if optimizer == "SGD" else torch.optim.Adam([logits], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        per_token_divergence(logits[None], target, beta=0.0, **clip).sum().backward()
        opt.step()
    with torch.no_grad():
        logged = per_token_divergence(logits[None], target, beta=0.0, **clip).item()
        kl = per_token_divergence(logits[None], target, beta=0.0).item()
        p_answer = torch.softmax(logits, -1)[ANSWER].item()
    return {"p_answer": p_answer, "kl": kl, "logged": logged}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--vocab", type=int, default=50)
    args = parser.parse_args(argv)
    student, teacher = distributions(args.vocab)
    kl0 = per_token_divergence(student.log()[None], teacher.log()[None], beta=0.0).item()
    settings = [
        ("no clip", {}),
        ("value clip, c = 0.05", dict(entry_clip=0.05, entry_clip_mode="value")),
        ("gradient clip, c = 0.05", dict(entry_clip=0.05, entry_clip_mode="gradient")),
        ("gradient clip, c = 0.2", dict(entry_clip=0.2, entry_clip_mode="gradient")),
    ]
    print(f"vocab {args.vocab}, {args.steps} steps; start: S(answer) = {student[ANSWER]:.3f}, "
          f"T(answer) = {teacher[ANSWER]:.3f}, KL(T||S) = {kl0:.3f}\n")
    print("| optimizer | clip | final S(answer) | final KL(T‖S), unclipped | final logged loss |")
    print("|---|---|---|---|---|")
    for optimizer in ("SGD, lr 1", "Adam, lr 0.05"):
        for name, clip in settings:
            r = train(student, teacher, optimizer.split(",")[0], args.steps, **clip)
            assert math.isfinite(r["kl"])
            print(f"| {optimizer} | {name} | {r['p_answer']:.3f} | {r['kl']:.4f} | {r['logged']:.4f} |")


if __name__ == "__main__":
    main()
