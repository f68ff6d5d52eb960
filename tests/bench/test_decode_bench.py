"""Decode benchmark (CPU smoke run with tiny presets; the figures come from the GPU run) and
the CUDA-graph step (GPU): replaying the captured step gives the eager step's logits."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "inference"))
from gen_fixtures import VOCAB, tiny_model  # noqa: E402

from retnet_train.bench.decode import main, speedup_rows  # noqa: E402
from retnet_train.inference.decoding import CudaGraphStep, make_decoder  # noqa: E402


def test_bench_cpu_rows_and_prompt_independent_state(capsys, tmp_path):
    out = tmp_path / "rows.jsonl"
    assert (
        main(
            [
                "--preset",
                "tiny",
                "--baseline",
                "transformer_tiny",
                "--prompt-len",
                "48",
                "--new-tokens",
                "3",
                "--batch-sizes",
                "1,2",
                "--check-prompt-len",
                "8",
                "--device",
                "cpu",
                "--dtype",
                "float32",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows == [json.loads(line) for line in out.read_text().splitlines()]
    ret = [r for r in rows if r.get("arch") == "retnet"]
    tra = [r for r in rows if r.get("arch") == "transformer"]
    assert [r["batch"] for r in ret] == [1, 2, 2] and [r["batch"] for r in tra] == [1, 2]
    # RetNet: the same state at prompt 48 and 8; the KV cache grows with the prompt
    assert ret[1]["state_bytes"] == ret[2]["state_bytes"] == 2 * 4 * 2 * 64 * 129 * 4  # B L H K (V+1) fp32
    assert tra[1]["state_bytes"] == 2 * 2 * 4 * 2 * 64 * 64 * 4  # K and V, B L H slots D fp32 (48+3+1 -> 64)
    assert all(r["tokens_per_s"] > 0 and r["ms_per_step"] > 0 for r in ret + tra)
    assert {r["batch"] for r in rows if r.get("summary") == "speedup"} == {1, 2}


def test_speedup_rows_name_each_baseline_and_out_of_memory():
    rows = [{"arch": "retnet", "batch": b, "prompt_len": 64, "tokens_per_s": 100.0 * b} for b in (1, 8)]
    rows += [
        {"arch": "transformer", "batch": 1, "prompt_len": 64, "tokens_per_s": 50.0},
        {"arch": "transformer", "batch": 8, "prompt_len": 64, "oom": "CUDA out of memory"},
        {"arch": "llama_hf_generate", "batch": 8, "prompt_len": 64, "tokens_per_s": 40.0},
        {"arch": "retnet", "batch": 8, "prompt_len": 16, "tokens_per_s": 1.0},
    ]  # another prompt: ignored
    assert speedup_rows(rows, [1, 8], 64) == [
        {
            "summary": "speedup",
            "batch": 1,
            "retnet_tokens_per_s": 100.0,
            "transformer_tokens_per_s": 50.0,
            "speedup_vs_transformer": 2.0,
        },
        {
            "summary": "speedup",
            "batch": 8,
            "retnet_tokens_per_s": 800.0,
            "transformer_tokens_per_s": "oom",
            "speedup_vs_transformer": None,
            "hf_llama_tokens_per_s": 40.0,
            "speedup_vs_hf_llama": 20.0,
        },
    ]


def test_bench_bad_arguments():
    with pytest.raises(SystemExit, match="--batch-sizes"):
        main(["--batch-sizes", "1,x", "--device", "cpu"])
    with pytest.raises(SystemExit, match="must be >= 1"):
        main(["--batch-sizes", "0", "--device", "cpu"])
    with pytest.raises(SystemExit, match="no model preset"):
        main(["--preset", "nope", "--device", "cpu", "--batch-sizes", "1"])
    for flag in ("--hf-llama-reference", "--fla-reference"):
        with pytest.raises(SystemExit, match=f"{flag} needs a CUDA device"):
            main([flag, "--device", "cpu", "--batch-sizes", "1"])
        with pytest.raises(SystemExit, match=f"^error: {flag} needs --new-tokens >= 2$"):
            main([flag, "--device", "cuda", "--batch-sizes", "1", "--new-tokens", "1"])


def test_a_reference_that_does_not_fit_is_an_oom_row(monkeypatch, capsys):
    """A Hugging Face reference out of memory at one batch size: its row says so (the error's first line)
    and the run goes on; the speedup row names it. Our model's rows are stubbed (no GPU here)."""
    from types import SimpleNamespace

    import retnet_train.bench.decode as decode

    def generate(arch, cfg, batch, *rest):
        if batch == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB\ndetails")
        return {"arch": arch, "batch": batch, "prompt_len": 16, "tokens_per_s": 20.0}

    monkeypatch.setattr(decode, "build", lambda *a: SimpleNamespace(config=SimpleNamespace(arch="retnet")))
    monkeypatch.setattr(
        decode, "run", lambda m, a, b, p, g: {"arch": "retnet", "batch": b, "prompt_len": p, "tokens_per_s": 40.0}
    )
    monkeypatch.setattr(decode, "bench_hf_generate", generate)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    argv = ["--preset", "tiny", "--baseline", "", "--fla-reference", "--device", "cuda", "--batch-sizes", "1,2"]
    assert main([*argv, "--prompt-len", "16", "--new-tokens", "4"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ref = "fla_retnet_hf_generate"
    assert rows[2:4] == [
        {"preset": "tiny", "arch": ref, "batch": 1, "prompt_len": 16, "tokens_per_s": 20.0},
        {
            "preset": "tiny",
            "arch": ref,
            "batch": 2,
            "prompt_len": 16,
            "oom": "CUDA out of memory. Tried to allocate 2 GiB",
        },
    ]
    assert [r.get("speedup_vs_fla_hf") for r in rows[4:]] == [2.0, None]
    assert rows[5]["fla_hf_tokens_per_s"] == "oom"


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("arch", ["retnet", "transformer"])
@torch.no_grad()
def test_cuda_graph_step_equals_eager(arch, compile):
    model = tiny_model(arch, retention_backend="auto") if arch == "retnet" else tiny_model(arch)
    model = model.cuda()
    ids = torch.randint(0, VOCAB, (3, 40), device="cuda")
    eager, graphed = make_decoder(model, 3, 60), make_decoder(model, 3, 60)
    a, b = eager.prefill(ids), graphed.prefill(ids)
    step = CudaGraphStep(graphed, compile=compile)
    tok = a.argmax(-1)
    for _ in range(8):
        a, b = eager.step(tok), step(tok)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        tok = a.argmax(-1)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["retnet", "transformer"])
@torch.no_grad()
def test_cuda_graph_step_with_document_starts_equals_eager(arch):
    """The captured step takes each row's document start as an input: a row that starts a document
    forgets what came before, replayed as in the eager step."""
    model = tiny_model(arch, retention_backend="auto") if arch == "retnet" else tiny_model(arch)
    model = model.cuda()
    ids = torch.randint(0, VOCAB, (3, 40), device="cuda")
    eager, graphed = make_decoder(model, 3, 60), make_decoder(model, 3, 60)
    a, b = eager.prefill(ids), graphed.prefill(ids)
    step = CudaGraphStep(graphed)
    tok = a.argmax(-1)
    for t in range(8):
        starts = torch.tensor([t % 3 == 0, False, t == 5], device="cuda")
        a, b = eager.step(tok, starts), step(tok, starts)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        tok = a.argmax(-1)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "fla"])
@torch.no_grad()
def test_gpu_padded_batch_prefill_and_graph_matches_full_forward(backend):
    """A left-padded batch: prefill through a GPU backend (fla hands resets with a state to the torch
    path), then CUDA-graph decode steps, against full forwards."""
    from retnet_train.inference.decoding import left_pad
    from retnet_train.inference.generate import generate
    from retnet_train.inference.sampling import SamplingParams
    from retnet_train.kernels import fla_available

    if backend == "fla" and not fla_available():
        pytest.skip("needs fla-core: pip install 'retnet-train[gpu]'")
    model = tiny_model("retnet", retention_backend=backend, d_model=256, n_heads=2).cuda()
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (150, 37, 90)]
    ids, starts, _ = left_pad(prompts, 0, "cuda")
    dec = make_decoder(model, 3, 0)
    logits = [dec.prefill(ids, starts)]
    step = CudaGraphStep(dec)
    new = torch.randint(0, VOCAB, (3, 6), device="cuda")
    for t in range(6):
        logits.append(step(new[:, t]).clone())
    got = torch.stack(logits, 1)
    for i, p in enumerate(prompts):
        full = torch.cat([torch.tensor(p, device="cuda"), new[i]])[None]
        ref = model(full, mode="chunkwise").logits[0, len(p) - 1 :]
        torch.testing.assert_close(got[i], ref, rtol=1e-2, atol=1e-2)
    a = generate(model, prompts, SamplingParams(12, temperature=0))
    b = generate(model, prompts, SamplingParams(12, temperature=0), cuda_graph=True)
    assert a.tokens == b.tokens


@pytest.mark.gpu
def test_bench_gpu_small(capsys):
    assert (
        main(
            [
                "--preset",
                "tiny",
                "--baseline",
                "transformer_tiny",
                "--prompt-len",
                "256",
                "--new-tokens",
                "16",
                "--batch-sizes",
                "1,4",
                "--check-prompt-len",
                "64",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ret = [r for r in rows if r.get("arch") == "retnet"]
    assert ret[1]["decode_peak_over_weights_gib"] == pytest.approx(ret[2]["decode_peak_over_weights_gib"], abs=0.01)
    assert all(r["cuda_graph"] for r in ret)


def test_gpu_memory_over_weights_and_the_weight_read_limit(monkeypatch):
    """The GPU rows' memory and bandwidth fields, with the device's figures stubbed (runs on CPU)."""
    from retnet_train.bench import decode_rows

    monkeypatch.setattr(decode_rows.torch.cuda, "max_memory_allocated", lambda: 3 * decode_rows.GIB)
    monkeypatch.setattr(decode_rows, "hbm_bandwidth", lambda: 4e12)
    got = decode_rows.memory_over_weights(
        8_000_000_000, 4_000_000_000, decode_rows.GIB, decode_rows.GIB // 2, ms_step=4.5
    )
    assert list(got.items()) == [
        ("decode_peak_over_weights_gib", 2.0),
        ("prefill_peak_over_weights_gib", 0.5),
        ("weights_only_limit_ms", 2.0),  # 8 GB at 4 TB/s
        ("weight_read_limit_ms", 3.0),  # weights and state
        ("step_over_limit", 1.5),
    ]
    monkeypatch.setattr(decode_rows, "hbm_bandwidth", lambda: None)  # a GPU not in the table: no limit
    assert list(decode_rows.memory_over_weights(8_000_000_000, 0, 0, 0, ms_step=1.0)) == [
        "decode_peak_over_weights_gib",
        "prefill_peak_over_weights_gib",
    ]


def test_hbm_bandwidth_tells_the_boards_of_one_name_apart():
    from retnet_train.bench import decode_rows

    assert decode_rows.hbm_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert decode_rows.hbm_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert decode_rows.hbm_bandwidth("NVIDIA H100 NVL") == 3.9e12
    assert decode_rows.hbm_bandwidth("NVIDIA A100-SXM4-40GB") == 1.555e12
    assert decode_rows.hbm_bandwidth("NVIDIA A100-SXM4-80GB") == 2.0e12
    assert decode_rows.hbm_bandwidth("NVIDIA H200") == 4.8e12
    assert decode_rows.hbm_bandwidth("NVIDIA GeForce RTX 4090") is None
