"""`optimizer.in_backward` (`OptimizerInBackward`): each parameter updated inside backward and its gradient freed.
The same updates as one optimizer over all parameters (with a schedule, across a state_dict round trip, in the
module with and without activation checkpointing); no more than one gradient alive at a time; no update for a
step without signal; exact resume; setups that need every gradient first are refused with the key to change."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_sd import OptimizerInBackward


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def _adamw(params, fused=None):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), fused=fused)


def _train(net, optimizer, steps: int, scheduler=None, start: int = 0) -> None:
    for i in range(start, start + steps):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)

        def closure():
            optimizer.zero_grad()
            loss = (net(x) - y).pow(2).mean()
            loss.backward()
            return loss

        optimizer.step(closure)
        if scheduler is not None:
            scheduler.step()


def _schedule(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))


@pytest.mark.parametrize("fused", [False, True], ids=["for-each", "fused"])
def test_the_same_updates_as_one_optimizer_over_all_parameters(fused):
    """float64, 5 steps of AdamW with weight decay under a decaying LR schedule."""
    a, b = _net(), _net()
    plain = _adamw(a.parameters(), fused)
    in_backward = OptimizerInBackward(b.parameters(), lambda ps: _adamw(ps, fused))
    _train(a, plain, 5, _schedule(plain))
    _train(b, in_backward, 5, _schedule(in_backward))
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=0, atol=1e-12)
        assert pb.grad is None  # every gradient was freed after its update
    assert in_backward.param_groups[0]["lr"] == plain.param_groups[0]["lr"] != 1e-2  # the schedule moved the LR


def test_at_most_one_gradient_is_alive_when_a_parameter_is_updated():
    net = _net()
    params = list(net.parameters())
    alive = []
    for p in params:  # registered first, so each runs just before the optimizer's hook for that parameter
        p.register_post_accumulate_grad_hook(lambda _: alive.append(sum(q.grad is not None for q in params)))
    _train(net, OptimizerInBackward(params, _adamw), 2)
    assert alive == [1] * (2 * len(params))


def test_the_state_exists_before_the_first_backward_and_the_weights_are_untouched():
    """The per-parameter state is made at construction (so it does not land among the first backward's
    temporaries): zero moments and step 0, the weights bit for bit as they were, no gradient left behind."""
    net = _net()
    before = [p.detach().clone() for p in net.parameters()]
    opt = OptimizerInBackward(net.parameters(), lambda ps: _adamw(ps, fused=True))
    for p, b, sub in zip(net.parameters(), before, opt._per_param):
        assert torch.equal(p, b) and p.grad is None
        state = sub.state[p]
        assert float(state["step"]) == 0
        assert state["exp_avg"].shape == p.shape and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    assert opt._per_param[0].param_groups[0]["lr"] == 1e-2 and opt._per_param[0].param_groups[0]["weight_decay"] == 0.1


def test_a_state_dict_round_trip_continues_exactly():
    a, b = _net(), _net()
    straight = OptimizerInBackward(a.parameters(), _adamw)
    _train(a, straight, 6)
    first = OptimizerInBackward(b.parameters(), _adamw)
    _train(b, first, 3)
    state = copy.deepcopy(first.state_dict())
    first.remove_hooks()
    resumed = OptimizerInBackward(b.parameters(), _adamw)
    resumed.load_state_dict(state)
    _train(b, resumed, 3, start=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_a_replaced_optimizer_frees_its_state():
    """A second optimizer over the same parameters (Lightning builds one per `fit`): the first one's state is
    freed once it is dropped, though the parameters keep its hooks (they hold it weakly), and the second one's
    updates are those of a fresh optimizer."""
    import gc
    import weakref

    a, b = _net(), _net()
    first = OptimizerInBackward(b.parameters(), _adamw)
    _train(b, first, 2)
    state = weakref.ref(first._per_param[0])
    del first
    gc.collect()
    assert state() is None
    with torch.no_grad():
        for pa, pb in zip(a.parameters(), b.parameters()):
            pa.copy_(pb)
    _train(a, _adamw(a.parameters()), 2, start=2)
    _train(b, OptimizerInBackward(b.parameters(), _adamw), 2, start=2)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=0, atol=1e-12)


def test_misuse_is_refused_or_harmless():
    net = _net()
    opt = OptimizerInBackward(net.parameters(), _adamw)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    net(torch.randn(2, 6, dtype=torch.float64)).sum().backward()  # outside step(): nothing is updated
    assert all(p.grad is not None for p in net.parameters())
    with pytest.raises(ValueError, match="optimizer.in_backward"):
        opt.load_state_dict(_adamw(_net().parameters()).state_dict())


# ------------------------------------------------------------------------------------------- in the module
def _per_parameter_state(trainer) -> list[dict]:
    return trainer.optimizers[0].state_dict()["per_parameter"]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "activation-checkpointing"])
def test_the_module_trains_as_with_the_plain_optimizer(records, checkpointing, monkeypatch):
    """3 steps of a float64 student with an EMA teacher and a warm-up schedule, by SGD (whose update is linear in
    the gradient, so a wrong normalization would show; AdamW is blind to the gradient's scale): the same weights
    as with the plain optimizer, to the loss kernel's float32 rounding (the loss is normalized before backward
    here, the gradients after it there)."""
    import test_training_signal
    from test_training_signal import run

    from lightning_sd.models import enable_activation_checkpointing, load_model

    def loaded(*args, **kwargs):
        model, tok = load_model(*args, **kwargs)
        if checkpointing:
            enable_activation_checkpointing(model)
        return model.double(), tok

    monkeypatch.setattr(test_training_signal, "load_model", loaded)
    sgd = {"name": "sgd", "lr": 1.0}
    plain, _ = run(records, 3, lambda step, i: True, optimizer=sgd)
    stepped, trainer = run(records, 3, lambda step, i: True, optimizer={**sgd, "in_backward": True})
    assert isinstance(trainer.optimizers[0], OptimizerInBackward)
    assert trainer.optimizers[0]._per_param[0].param_groups[0]["fused"] is True  # optimizer.fused=null still fuses
    moved = 0.0
    for (name, a), b, init in zip(plain.student.named_parameters(), stepped.student.parameters(),
                                  loaded("tiny", seed=0)[0].parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-9, msg=name)
        moved = max(moved, float((a - init).abs().max()))
        assert b.grad is None
    assert moved > 1e-3  # the comparison means something: the weights did move


def test_a_step_without_signal_updates_nothing(records):
    from test_training_signal import run

    one = run(records, 1, lambda step, i: True, optimizer={"in_backward": True})
    four = run(records, 4, lambda step, i: step == 0, optimizer={"in_backward": True})
    assert four[0].empty_steps == 3
    for a, b in zip(one[0].student.parameters(), four[0].student.parameters()):
        assert torch.equal(a, b)
    for sa, sb in zip(_per_parameter_state(one[1]), _per_parameter_state(four[1])):
        for k, v in sa["state"][0].items():
            assert torch.equal(v, sb["state"][0][k]), k
    assert one[1].optimizers[0].param_groups[0]["lr"] == four[1].optimizers[0].param_groups[0]["lr"]


def test_resume_continues_exactly(records, tmp_path):
    from test_training_signal import run

    straight = run(records, 4, lambda step, i: True, optimizer={"in_backward": True})
    run(records, 4, lambda step, i: True, optimizer={"in_backward": True}, ckpt_dir=tmp_path, stop_after=2)
    resumed = run(records, 4, lambda step, i: True, optimizer={"in_backward": True}, ckpt_dir=tmp_path,
                  ckpt_path=str(tmp_path / "last.ckpt"))
    for a, b in zip(straight[0].student.parameters(), resumed[0].student.parameters()):
        assert torch.equal(a, b)
    for sa, sb in zip(_per_parameter_state(straight[1]), _per_parameter_state(resumed[1])):
        assert sa["state"][0]["step"] == sb["state"][0]["step"] == 4
        for k, v in sa["state"][0].items():
            assert torch.equal(v, sb["state"][0][k]), k


# ------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("override, key", [
    ([], "trainer.gradient_clip_val=1.0"),  # train.py clips by default: the message says to set it to null
    (["trainer.gradient_clip_val=null", "trainer.accumulate_grad_batches=2"], "trainer.accumulate_grad_batches=2"),
    (["trainer.gradient_clip_val=null", "trainer=ddp_cpu"], "trainer.strategy=ddp"),
])
def test_train_py_refuses_setups_that_need_every_gradient_first(override, key):
    from test_config import compose_cfg

    from lightning_sd.config import ConfigError, validate_config

    cfg = compose_cfg(["optimizer.in_backward=true", *override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(cfg)
    validate_config(compose_cfg(["optimizer.in_backward=true", "trainer.gradient_clip_val=null"]))


def test_the_module_refuses_a_clipping_trainer(records):
    from test_training_signal import run

    with pytest.raises(ValueError, match=r"gradient_clip_val=1.0.*set it to null"):
        run(records, 1, lambda step, i: True, optimizer={"in_backward": True}, gradient_clip_val=1.0)
