"""`FailureCounters`: logs how many rollouts got no verifier signal so far (`train/verifier_failures`, a
running total that survives a resume): the verifier raised, timed out, or returned something other than a
`Verdict`. Those rollouts keep reward None (no reward signal; contexts that need it mask the row) and
training goes on; this makes the count visible next to the loss."""

from __future__ import annotations

from lightning.pytorch import Callback


class FailureCounters(Callback):
    def __init__(self) -> None:
        self.verifier_failures = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch.verifier_failures is None:  # no verifier ran on this batch
            return
        self.verifier_failures += int(batch.verifier_failures)
        pl_module.log("train/verifier_failures", float(self.verifier_failures), on_step=True, on_epoch=False,
                      batch_size=1, sync_dist=trainer.world_size > 1, reduce_fx="sum")  # all ranks' rollouts

    def state_dict(self) -> dict:
        return {"verifier_failures": self.verifier_failures}

    def load_state_dict(self, state_dict: dict) -> None:
        self.verifier_failures = int(state_dict.get("verifier_failures", 0))


__all__ = ["FailureCounters"]
