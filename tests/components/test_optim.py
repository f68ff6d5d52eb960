"""components/optim: the learning-rate schedule, the weight-decay groups and GuardedAdamW (the optimizer
of fp32 ZeRO-0: clipping, and a step skipped on a non-finite gradient)."""

import pytest
import torch

from retnet_train.components.optim import GuardedAdamW, lr_lambda, param_groups
from retnet_train.model import RetNetConfig, RetNetForCausalLM


def test_lr_schedule_warmup_and_decay():
    assert lr_lambda(0, 10, 100, "linear", 0.0) == pytest.approx(0.1)
    assert lr_lambda(9, 10, 100, "linear", 0.0) == pytest.approx(1.0)
    assert lr_lambda(55, 10, 100, "linear", 0.0) == pytest.approx(0.5)
    assert lr_lambda(100, 10, 100, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_lambda(50, 10, 100, "constant", 0.0) == 1.0


def test_wsd_schedule_warms_up_holds_the_peak_then_decays_over_the_last_fraction():
    """Warm-up 10 of 100 steps, decay_fraction 0.2: peak from index 9, the decay over indices 80..100."""
    wsd = {s: lr_lambda(s, 10, 100, "linear", 0.1, 0.2) for s in range(101)}
    assert wsd[0] == pytest.approx(0.1) and wsd[9] == 1.0  # warm-up as without a stable phase
    assert all(wsd[s] == 1.0 for s in range(9, 81))  # step == warmup, the stable phase, the decay's start
    assert wsd[81] == pytest.approx(0.1 + 0.9 * 0.95)  # the first step below the peak
    assert wsd[90] == pytest.approx(0.55)
    assert wsd[99] == pytest.approx(0.1 + 0.9 * 0.05)  # the last update
    assert wsd[100] == pytest.approx(0.1) and lr_lambda(150, 10, 100, "linear", 0.1, 0.2) == pytest.approx(0.1)
    assert lr_lambda(90, 10, 100, "cosine", 0.1, 0.2) == pytest.approx(0.55)
    assert lr_lambda(85, 10, 100, "sqrt", 0.1, 0.2) == pytest.approx(0.1 + 0.9 * 0.5)  # 1 - sqrt(1/4)
    assert lr_lambda(99, 10, 100, "sqrt", 0.0, 0.2) == pytest.approx(1 - 0.95**0.5)
    assert lr_lambda(100, 10, 100, "sqrt", 0.1, 0.2) == pytest.approx(0.1)
    assert lr_lambda(100, 10, 100, "cosine", 0.0, 0.2) == pytest.approx(0.0, abs=1e-15)


def test_sqrt_decay_without_a_stable_phase():
    assert lr_lambda(10, 10, 110, "sqrt", 0.0) == 1.0
    assert lr_lambda(35, 10, 110, "sqrt", 0.0) == pytest.approx(0.5)
    assert lr_lambda(110, 10, 110, "sqrt", 0.2) == pytest.approx(0.2)


@pytest.mark.parametrize("decay", ["linear", "cosine", "sqrt"])
def test_decay_fraction_never_starts_the_decay_inside_the_warmup(decay):
    """A fraction covering the warm-up (0.9 and 1 of 100 steps after 10 of warm-up) is the schedule
    without a stable phase, bit for bit."""
    for fraction in (0.9, 1.0):
        assert [lr_lambda(s, 10, 100, decay, 0.1, fraction) for s in range(101)] == [
            lr_lambda(s, 10, 100, decay, 0.1) for s in range(101)
        ]


def test_wsd_decay_length_rounds_and_takes_at_least_one_step():
    """0.2 of 25,000 steps: the decay starts at index 20,000; 0.001 of 100 steps: the last step decays."""
    assert lr_lambda(20_000, 375, 25_000, "linear", 0.0, 0.2) == 1.0
    assert lr_lambda(20_001, 375, 25_000, "linear", 0.0, 0.2) == pytest.approx(1 - 1 / 5000)
    assert lr_lambda(99, 10, 100, "linear", 0.0, 0.001) == 1.0
    assert lr_lambda(100, 10, 100, "linear", 0.0, 0.001) == 0.0


def test_no_weight_decay_on_norms_biases_embeddings():
    model = RetNetForCausalLM(RetNetConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, ffn_dim=32))
    decay, no_decay = param_groups(model, 0.1, no_decay_embeddings=True)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim == 2 and "embed_tokens" not in names[id(p)] for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"embed_tokens.weight", "norm.weight", "norm.bias"}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decay2, _ = param_groups(model, 0.1, no_decay_embeddings=False)
    assert any(names[id(p)] == "embed_tokens.weight" for p in decay2["params"])


def test_guarded_adamw_skips_nonfinite_and_clips():
    w = torch.nn.Parameter(torch.ones(3))
    opt = GuardedAdamW([w], max_norm=1.0, lr=0.1)
    w.grad = torch.tensor([float("nan"), 0.0, 0.0])
    opt.step()
    assert torch.equal(w.detach(), torch.ones(3)) and not opt.state
    w.grad = torch.tensor([3.0, 4.0, 0.0])
    opt.step()
    assert opt.last_grad_norm == pytest.approx(5.0)
    assert w.grad.norm().item() == pytest.approx(1.0)
    assert not torch.equal(w.detach(), torch.ones(3))


def test_guarded_adamw_without_clipping_takes_plain_adamws_step():
    """optim.grad_clip=0 is no clipping: the gradient stays whole, its norm is still recorded, and the
    update is plain AdamW's, bit for bit."""
    grad = torch.tensor([30.0, -40.0, 0.5])
    w, ref = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = GuardedAdamW([w], max_norm=0.0, lr=0.1, weight_decay=0.01)
    plain = torch.optim.AdamW([ref], lr=0.1, weight_decay=0.01)
    for _ in range(2):
        w.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        plain.step()
    assert torch.equal(w.grad, grad) and not opt.overflow
    assert opt.last_grad_norm == pytest.approx(grad.norm().item())
    assert torch.equal(w.detach(), ref.detach())
