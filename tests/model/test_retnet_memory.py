"""What RetNet keeps for the backward: activation checkpointing, kept chunk states, and the compiled
block (bf16 gate input, activation memory budget), each for the same gradients."""

import copy
import functools
import re

import pytest
import torch
from retnet_helpers import VOCAB, make_model

from retnet_train.model import RetNetConfig, RetNetForCausalLM
from retnet_train.parallel import parallelize


def _saved_bytes_and_grads(model, ids, mode):
    """Bytes the forward keeps for the backward (via saved-tensor hooks), and the gradients."""
    model = parallelize(copy.deepcopy(model), activation_checkpointing=mode)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids).loss
    loss.backward()
    return sum(saved), torch.cat([p.grad.flatten() for p in model.parameters()])


def test_activation_checkpointing_same_gradients_less_memory():
    model = make_model().train()
    ids = torch.randint(0, VOCAB, (2, 12))
    kept = {}
    grads = {}
    for mode in ("none", "selective", "full", True, False):
        kept[mode], grads[mode] = _saved_bytes_and_grads(model, ids, mode)
        assert torch.allclose(grads[mode], grads["none"], atol=1e-6), mode
    # selective recomputes the projections with the core: the blocks keep none of q, k, v (fp32 here)
    cfg = model.config
    qkv_bytes = cfg.n_layers * ids.numel() * (2 * cfg.d_model + cfg.value_dim) * 4
    assert kept["full"] < kept["selective"] <= kept["none"] - qkv_bytes
    assert kept[True] == kept["full"] and kept[False] == kept["none"]
    with pytest.raises(ValueError, match="selective"):
        parallelize(model, activation_checkpointing="some")


def test_keeping_the_chunk_states_gives_the_same_gradients_for_more_memory():
    """retention_recompute=false: autograd keeps the chunk states [B, H, T/C + 1, K, V] instead of the
    backward recomputing them, for the same gradients."""
    ids = torch.randint(0, VOCAB, (2, 12))
    recomputed = make_model(retention_backend="torch").train()
    kept = make_model(retention_backend="torch", retention_recompute=False).train()
    kept.load_state_dict(recomputed.state_dict())
    bytes_recomputed, grads_recomputed = _saved_bytes_and_grads(recomputed, ids, "none")
    bytes_kept, grads_kept = _saved_bytes_and_grads(kept, ids, "none")
    assert torch.allclose(grads_kept, grads_recomputed, atol=1e-6)
    B, H, N, K, V = 2, 2, 12 // 4, 16, 32  # make_model: d 32, 2 heads, value dim 2d, chunk 4
    assert bytes_kept - bytes_recomputed >= 2 * B * H * (N + 1) * K * V * 4  # both layers' fp32 states


@functools.lru_cache(maxsize=None)  # the compiled default serves two tests: one CPU compile less
def kept_for_backward(compiled, activation_memory_budget=1.0, T=256):
    """One bf16 block (two heads, d_v 256) trained one step: [(bytes, dtype, numel)] of each tensor
    autograd keeps for backward (saved-tensor hooks see a compiled graph's too), and the gradients."""
    torch.manual_seed(0)
    model = (
        RetNetForCausalLM(
            RetNetConfig(
                vocab_size=VOCAB,
                d_model=128,
                n_layers=1,
                n_heads=2,
                ffn_dim=192,
                chunk_size=64,
                retention_backend="torch",
            )
        )
        .to(torch.bfloat16)
        .train()
    )
    if compiled:
        parallelize(model, compile=True, activation_memory_budget=activation_memory_budget)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen.setdefault(s.data_ptr(), (s.nbytes(), t.dtype, t.numel()))
        return t

    ids = torch.randint(0, VOCAB, (1, T))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, labels=ids, return_logits=False).loss
        loss.backward()
    finally:
        torch._dynamo.reset()
        torch._functorch.config.activation_memory_budget = 1.0  # process-wide: back to torch's default
    return list(seen.values()), {n: p.grad.float() for n, p in model.named_parameters()}


def test_compiled_block_keeps_the_gate_input_in_bf16():
    """Under torch.compile the gate's silu upcasts g to fp32; with g computed before the retention
    the compiled graph kept that fp32 copy for backward instead of bf16 g (+1.5 GiB at 1.3B, 8k,
    measured on an H200). No fp32 [T, d_v] tensor may be kept, and compiled keeps less than eager.
    Two heads, as every preset has several: with one head the [B, T, H, V] transpose is a no-op and
    the partitioner keeps the group norm's fp32 input instead (seen on CPU, not at preset shapes)."""
    T, vd = 256, 256
    compiled, eager = kept_for_backward(True)[0], kept_for_backward(False)[0]
    assert not [s for s in compiled if s[1] == torch.float32 and s[2] >= T * vd], compiled
    assert sum(s[0] for s in compiled) < sum(s[0] for s in eager)


def test_activation_memory_budget_keeps_less_for_the_same_gradients():
    """A budget below 1 makes the compiled backward recompute elementwise work: at 0.8 this block
    keeps ~19% fewer bytes (1.21 -> 0.98 MB on CPU), and the gradients are the same computation."""
    full, grads = kept_for_backward(True)
    lean, lean_grads = kept_for_backward(True, activation_memory_budget=0.8)
    assert sum(s[0] for s in lean) < 0.85 * sum(s[0] for s in full)
    for name, g in grads.items():
        torch.testing.assert_close(lean_grads[name], g, rtol=2e-2, atol=1e-3, msg=name)
    for budget, compile_ in ((1.5, True), (0.0, True), (0.8, False)):
        with pytest.raises(ValueError, match="activation_memory_budget"):
            parallelize(make_model(), compile=compile_, activation_memory_budget=budget)


def test_compiled_gated_norm_backward_is_one_pass():
    """The gate and the per-head norm in o's [B, T, H, V] shape: torch.compile fuses the block's
    backward gate and norm gradients into one kernel. With the gate in the flattened [B, T, H * V]
    shape the iteration spaces differ and they came out as separate kernels (norm recomputed, gate
    gradient, norm gradient): two more passes over 2d-wide tensors per layer."""
    from torch._inductor.utils import run_and_get_code

    model = parallelize(make_model(n_layers=1).train(), compile=True, activation_memory_budget=0.8)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    try:
        _, codes = run_and_get_code(lambda: model(ids, labels=ids).loss.backward())
    finally:
        torch._dynamo.reset()
        torch._functorch.config.activation_memory_budget = 1.0  # process-wide: back to torch's default
    kernels = re.findall(r"^(cpp_fused_\w+) = ", codes[-1], re.M)
    fused = [k for k in kernels if "native_layer_norm_backward" in k and "silu_backward" in k]
    assert len(fused) == 1, kernels
