"""The forward pass that scores a completion: `completion_logits` (logits `[R, C, V]`) and `completion_hidden`
(final hidden states `[R, C, H]`, for the memory-bounded loss) of a model on prompt + completion, computed
for the completion positions only. The student's and the teacher's scores in training, and evaluation's
KL from a reference, all come from here.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_sd.sampling import position_ids_from_mask


def _decoder(model: nn.Module) -> nn.Module:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


def completion_logits(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                      completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Logits `[R, C, V]` where position t scores completion token t; logits are computed only for the C
    completion positions (`logits_to_keep`), never for the prompt. Prompts left-padded `[R, P]`.

    The last completion token scores nothing, so it is not fed: the input is prompt + completion[:-1] and the
    last C positions (the last prompt token, then completion tokens 0..C-2) give the C contiguous logit rows."""
    ids = torch.cat([prompt_ids, completion_ids[:, :-1]], dim=1)
    mask = torch.cat([prompt_mask, completion_mask[:, :-1]], dim=1)
    c = completion_ids.size(1)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                logits_to_keep=c, use_cache=False)
    return out.logits


def completion_hidden(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                      completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states `[R, C, H]` at the positions that score the completion tokens (for the
    memory-bounded loss, which applies the output embedding chunk by chunk). Like `completion_logits`, the last
    completion token is not fed."""
    ids = torch.cat([prompt_ids, completion_ids[:, :-1]], dim=1)
    mask = torch.cat([prompt_mask, completion_mask[:, :-1]], dim=1)
    c = completion_ids.size(1)
    out = _decoder(model)(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                          use_cache=False)
    return out.last_hidden_state[:, -c:]


__all__ = ["completion_logits", "completion_hidden"]
