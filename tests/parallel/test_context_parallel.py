"""Context parallel RetNet on real gloo ranks equals the whole sequence on one process: logits, loss
and every parameter gradient (fp32: 1e-5 per element, and 5e-6 of each gradient's norm), with and without
the paper's normalization, document starts on, inside and away from rank boundaries, chunk sizes that
do and do not divide T / P. In bf16 it rounds no worse than one process does."""

import copy
import itertools

import pytest
import torch
import torch.distributed as dist
from cp_helpers import run_ranks

from retnet_train.model import RetNetConfig, RetNetForCausalLM
from retnet_train.parallel import build_context_parallel, parallelize

VOCAB, T, B = 97, 24, 2


def make_model(seed, **overrides):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, ffn_dim=48, retention_backend="torch")
    cfg.update(overrides)
    model = RetNetForCausalLM(RetNetConfig(**cfg))
    with torch.no_grad():  # larger than the init so the score-sum clamp max(|s|, 1) is active
        for block in model.layers:
            w = block.retention.projection_weights()
            w["q"].mul_(6)
            w["k"].mul_(6)
    return model


def doc_starts(kind, P):
    if kind == "none":
        return None
    local = T // P
    starts = torch.zeros(B, T, dtype=torch.bool)
    # row 0: a start exactly at rank 1's first token and one inside rank 1's part (P=3: rank 2
    # has none, so it receives rank 1's state only); row 1: one start inside rank 0's part only,
    # so every later rank receives rank 0's last document through the decay product
    starts[0, local] = starts[0, local + 3] = True
    starts[1, 5] = True
    return starts


def forward_backward(model, ids, labels, starts, mode, chunk):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels, doc_starts=starts, mode=mode, chunk_size=chunk)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def compare_cases(rank, world, cases):
    cp, _, _ = build_context_parallel(world, rank, world, T)
    failures = []
    for normalize, kind, chunk, mode, recompute in cases:
        plain = make_model(0, normalize_retention=normalize)
        # recomputation repeats the exchange in backward
        model = parallelize(copy.deepcopy(plain), activation_checkpointing=recompute)
        cp_model = parallelize(plain, activation_checkpointing=recompute, context_parallel=cp)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, VOCAB, (B, T), generator=g)
        labels = torch.randint(0, VOCAB, (B, T), generator=g)
        labels[0, : T // 2 + 2] = -100  # uneven valid tokens per rank: the loss scaling must hold
        starts = doc_starts(kind, world)
        ref_logits, ref_loss, ref_grads = forward_backward(model, ids, labels, starts, mode, chunk)

        logits, loss, grads = forward_backward(
            cp_model, cp.shard(ids), cp.shard(labels), None if starts is None else cp.shard(starts), mode, chunk
        )
        parts = [torch.empty_like(logits) for _ in range(world)]
        dist.all_gather(parts, logits)
        dist.all_reduce(loss)
        case = dict(normalize=normalize, docs=kind, chunk=chunk, mode=mode, recompute=recompute)
        checks = [("logits", torch.cat(parts, dim=1), ref_logits), ("loss", loss / world, ref_loss)]
        for name, grad in grads.items():
            dist.all_reduce(grad)  # what DeepSpeed does over the ranks (then / W)
            checks.append((name, grad / world, ref_grads[name]))
        for name, got, want in checks:
            try:
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            except AssertionError as e:
                failures.append(f"{case} {name}: {str(e).splitlines()[-3:]}")
            # fp32 rounding alone leaves < 2e-6 of the norm: a wrong decay, state or scale leaves far more
            if (got - want).norm() > 5e-6 * want.norm():
                failures.append(f"{case} {name}: off by {((got - want).norm() / want.norm()).item():.1e} of its norm")
    return failures


def cases_for(world):
    chunks = [4, 5] if world == 2 else [3, 8]  # T / P = 12 or 8: divides, does not divide
    cases = [(n, k, c, "chunkwise", "none") for n, k, c in itertools.product([True, False], ["none", "docs"], chunks)]
    return cases + [
        (True, "docs", 64, "parallel", "none"),
        (True, "docs", chunks[1], "chunkwise", "full"),
        (False, "docs", chunks[0], "chunkwise", "selective"),
    ]


def compare_and_bf16(rank, world, cases):
    return compare_cases(rank, world, cases), bf16_errors(rank, world)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """(compare_cases' failures, bf16_errors' errors) of each of 2 ranks, from one spawn: the fp32 comparison
    and the bf16 test share its start (~2.5 s)."""
    return run_ranks(compare_and_bf16, 2, tmp_path_factory.mktemp("two_ranks"), cases_for(2))


@pytest.mark.parametrize("world", [2, 3])
def test_context_parallel_equals_one_process(world, tmp_path, request):
    if world == 2:
        results = [failures for failures, _ in request.getfixturevalue("two_ranks")]
    else:
        results = run_ranks(compare_cases, world, tmp_path, cases_for(world))
    failures = [f for r in results for f in r]
    assert not failures, "\n".join(failures[:20])


def relative_error(got, exact):
    return ((got.double() - exact).norm() / exact.norm()).item()


def bf16_errors(rank, world):
    """{"normalize=N name": (context parallel's error, one process's error)} of the logits and every parameter
    gradient of a bf16 model, each against the float64 result of the same (bf16) weights."""
    cp, _, _ = build_context_parallel(world, rank, world, T)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    labels = torch.randint(0, VOCAB, (B, T), generator=g)
    starts = doc_starts("docs", world)
    errors = {}
    for normalize in (True, False):
        plain = make_model(0, normalize_retention=normalize).to(torch.bfloat16)
        exact, one = copy.deepcopy(plain).double(), copy.deepcopy(plain)
        cp_model = parallelize(plain, context_parallel=cp)
        ref_logits, _, ref_grads = forward_backward(exact, ids, labels, starts, "chunkwise", 4)
        one_logits, _, one_grads = forward_backward(one, ids, labels, starts, "chunkwise", 4)
        logits, _, grads = forward_backward(cp_model, cp.shard(ids), cp.shard(labels), cp.shard(starts), "chunkwise", 4)
        parts = [torch.empty_like(logits) for _ in range(world)]
        dist.all_gather(parts, logits)
        got = {"logits": torch.cat(parts, dim=1)}
        for name, grad in grads.items():
            dist.all_reduce(grad)  # in bf16, as DeepSpeed reduces bf16 gradients
            got[name] = grad / world
        for name, value in got.items():
            ref, base = (ref_logits, one_logits) if name == "logits" else (ref_grads[name], one_grads[name])
            errors[f"normalize={normalize} {name}"] = (relative_error(value, ref), relative_error(base, ref))
    return errors


def test_bf16_context_parallel_rounds_as_one_process(two_ranks):
    """In bf16 the two ranks' logits and gradients differ from one process's (other summation order, the
    exchanged state rounded where it meets q), but lie as close to the exact float64 values: each
    error within 1.25x one process's (measured: 0.42-1.11x, errors 0.4-7% of the norm)."""
    errors = two_ranks[0][1]
    worse = {name: (cp, one) for name, (cp, one) in errors.items() if cp > 1.25 * one}
    assert not worse, worse


def test_state_is_refused_under_context_parallel():
    from retnet_train.parallel import ContextParallel

    model = parallelize(make_model(0), context_parallel=ContextParallel(None, 0, 2))
    state = make_model(0)(torch.zeros(B, 1, dtype=torch.long), return_state=True).state
    for kw in (dict(return_state=True), dict(state=state)):
        with pytest.raises(ValueError, match="context parallel"):
            model(torch.randint(0, VOCAB, (B, T // 2)), **kw)


def test_loss_weight_is_the_group_tokens_over_p(monkeypatch):
    """A context-parallel rank's loss is P * (its token-loss sum) / (the group's valid tokens), so it stands for
    group tokens / P: the P ranks' weights sum to the group's valid tokens (validation's token count), not P
    times them. Without context parallelism a rank's weight is its own valid tokens."""
    from retnet_train.parallel import ContextParallel, loss_weight

    labels = torch.tensor([[1, -100, 2, 3]])  # 3 valid labels here
    monkeypatch.setattr(dist, "all_reduce", lambda t, group=None: t.add_(5))  # 5 on the other rank
    assert loss_weight(ContextParallel(None, 0, 2), labels).item() == (3 + 5) / 2
    assert loss_weight(None, labels).item() == 3
