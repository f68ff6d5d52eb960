"""parallelize: what it changes from outside the model, and what stays as the plain model has it
(parameter names, outputs); the model itself sets no process-wide torch config."""

import copy

import pytest
import torch
import torch._functorch.config

from retnet_train.model import RetNetConfig, RetNetForCausalLM, TransformerConfig, TransformerForCausalLM
from retnet_train.parallel import parallelize

VOCAB = 61


def build(arch):
    torch.manual_seed(0)
    if arch == "retnet":
        return RetNetForCausalLM(RetNetConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, ffn_dim=48))
    return TransformerForCausalLM(TransformerConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, ffn_dim=48))


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.fixture
def budget_restored():
    yield
    torch._functorch.config.activation_memory_budget = 1.0  # process-wide: back to torch's default


@pytest.mark.parametrize("arch", ["retnet", "transformer"])
def test_the_model_sets_no_process_wide_torch_config(arch, budget_restored):
    torch._functorch.config.activation_memory_budget = 0.625
    model = build(arch).train()
    loss_and_grads(model, torch.randint(0, VOCAB, (2, 9)))
    assert torch._functorch.config.activation_memory_budget == 0.625


def test_compile_sets_the_activation_memory_budget(budget_restored):
    model = parallelize(build("retnet"), compile=True, activation_memory_budget=0.7)
    assert torch._functorch.config.activation_memory_budget == 0.7
    # the forward is compiled, not the module call: ZeRO-3's hooks on the block stay outside the graph
    assert all("forward" in vars(block) for block in model.layers)


def test_compile_mode_reaches_torch_compile(monkeypatch, budget_restored):
    """mode (reduce-overhead: CUDA graphs) goes to torch.compile for every block; a mode torch.compile
    does not know is refused before anything is compiled."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: (seen.append(mode), fn)[1])
    model = parallelize(build("retnet"), compile=True, compile_mode="reduce-overhead")
    assert seen == ["reduce-overhead", "reduce-overhead"]
    # each block gradient reaches .grad as a copy (a CUDA graph's output would be overwritten by the next
    # micro-batch), and two micro-batches still accumulate to the sum of their gradients
    params = dict(model.layers.named_parameters())
    assert all(len(p._backward_hooks) == 1 for p in params.values())
    ids = torch.randint(0, VOCAB, (2, 9))
    first = {name: g.clone() for name, g in loss_and_grads(model, ids)[1].items()}
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * first[name], msg=name)
    with pytest.raises(ValueError, match=r"^compile mode: 'fast' is not one of \['default', 'reduce-overhead'"):
        parallelize(build("retnet"), compile=True, compile_mode="fast")


@pytest.mark.parametrize("arch", ["retnet", "transformer"])
@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_checkpointing_keeps_names_and_results(arch, mode):
    """Recomputation changes what is kept, not what is computed: the same loss and gradients
    bit for bit, and the parameter names (state dicts, DeepSpeed's checkpoints) of the plain model."""
    plain = build(arch).train()
    model = parallelize(copy.deepcopy(plain), activation_checkpointing=mode)
    assert list(model.state_dict()) == list(plain.state_dict())
    ids = torch.randint(0, VOCAB, (2, 9))
    want_loss, want = loss_and_grads(plain, ids)
    got_loss, got = loss_and_grads(model, ids)
    assert torch.equal(got_loss, want_loss)
    for name, grad in want.items():
        assert torch.equal(got[name], grad), name


def test_a_model_is_parallelized_once():
    model = parallelize(build("retnet"), activation_checkpointing="selective")
    with pytest.raises(ValueError, match="parallelized already"):
        parallelize(model, activation_checkpointing="selective")


@pytest.mark.parametrize(
    "options, error",
    [
        (dict(compile=True, activation_memory_budget=1.5), r"^activation_memory_budget: 1.5 is not in \(0, 1\]"),
        (dict(compile=True, activation_memory_budget=0.0), r"^activation_memory_budget: 0.0 is not in \(0, 1\]"),
        (dict(activation_memory_budget=1.5), r"^activation_memory_budget: 1.5 is not in \(0, 1\]"),
        (dict(activation_memory_budget=0.5), r"^activation_memory_budget: 0.5 needs compile"),
        (dict(compile=True, compile_mode="fast"), r"^compile mode: 'fast' is not one of"),
    ],
)
def test_bad_options_are_refused_before_the_model_changes(options, error, budget_restored):
    """An option parallelize refuses leaves the model as built (not half context-parallel), so that the
    call can be repeated with the option corrected."""
    from retnet_train.parallel import ContextParallel

    model = build("retnet")
    cp = ContextParallel(None, 0, 2)
    with pytest.raises(ValueError, match=error):
        parallelize(model, context_parallel=cp, activation_checkpointing="selective", **options)
    assert not any(vars(m).keys() & {"forward", "mix", "retention_core"} for m in model.modules())
    assert torch._functorch.config.activation_memory_budget == 1.0
    parallelize(model, context_parallel=cp)


@pytest.mark.parametrize("mode, runs", [("none", (2, 2, 2)), ("selective", (4, 4, 2)), ("full", (4, 4, 4))])
def test_checkpointing_reruns_what_it_recomputes_in_the_backward(monkeypatch, mode, runs):
    """What the backward recomputes runs twice per training step: "selective" the q, k, v projections and
    the retention core of each of the 2 layers (not the FFN), "full" the whole block, "none" nothing."""
    from retnet_train.model.layers import FeedForward
    from retnet_train.model.retnet import MultiScaleRetention

    counts = {"projections": 0, "retain": 0, "ffn": 0}

    def counting(name, fn):
        def run(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return run

    for name in ("projections", "retain"):
        monkeypatch.setattr(MultiScaleRetention, name, counting(name, getattr(MultiScaleRetention, name)))
    monkeypatch.setattr(FeedForward, "forward", counting("ffn", FeedForward.forward))
    model = parallelize(build("retnet").train(), activation_checkpointing=mode)
    loss_and_grads(model, torch.randint(0, VOCAB, (2, 9)))
    assert (counts["projections"], counts["retain"], counts["ffn"]) == runs


@pytest.mark.parametrize(
    "options",
    [dict(activation_checkpointing="full"), dict(activation_checkpointing="selective"), dict(compile=True)],
    ids=["full", "selective", "compile"],
)
def test_a_deepcopy_of_a_parallelized_model_is_refused(options, budget_restored):
    """Its replaced forward / mix are bound to the original modules: a copy would run the original's weights."""
    model = parallelize(build("retnet"), **options)
    for part in (model, model.layers[0]):
        with pytest.raises(
            TypeError, match=r"^copy.deepcopy: parallelize\(\) replaced this .* copy the model before parallelize\(\)"
        ):
            copy.deepcopy(part)
    assert copy.deepcopy(build("retnet")) is not None  # a model parallelize() has not changed copies as always
