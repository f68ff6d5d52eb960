"""generate(): greedy output equals a naive full-forward loop; EOS stops a row; sampling
filters (top-k, top-p, temperature) are right; bad parameters are clear errors; the CLI runs."""

import pytest
import torch
from gen_fixtures import VOCAB, tiny_model, train_tokenizer

from retnet_train.inference.generate import generate, main
from retnet_train.inference.native import save_native
from retnet_train.inference.sampling import SamplingParams, prompt_generators, sample
from retnet_train.inference.streaming import TextStreamer


def naive_greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("arch", ["retnet", "transformer"])
@torch.no_grad()
def test_greedy_batch_equals_naive_loop(arch):
    model = tiny_model(arch).double()
    prompts = [[3, 17, 99, 4, 5, 200, 8], [42], [7, 7, 7]]
    res = generate(model, prompts, SamplingParams(max_new_tokens=6, temperature=0))
    assert res.tokens == [naive_greedy(model, p, 6) for p in prompts]
    assert res.stopped_at_eos == [False] * 3


@torch.no_grad()
def test_stops_at_eos_per_row():
    model = tiny_model("retnet").double()
    prompts = [[3, 17, 99], [42, 9]]
    free = [naive_greedy(model, p, 8) for p in prompts]
    eos = free[0][2]  # row 0 emits this token third
    res = generate(model, prompts, SamplingParams(max_new_tokens=8, temperature=0), eos_id=eos)
    assert res.tokens[0] == free[0][:2] and res.stopped_at_eos[0]
    cut = free[1].index(eos) if eos in free[1] else 8
    assert res.tokens[1] == free[1][:cut] and res.stopped_at_eos[1] == (cut < 8)


def test_sampling_filters():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits[:3], SamplingParams(temperature=0)), torch.zeros(3, dtype=torch.long))
    k = sample(logits, SamplingParams(top_k=3), g)
    assert set(k.tolist()) == {0, 1, 2}
    probs = logits[0].softmax(-1)  # top_p=0.8 keeps the smallest prefix with mass >= 0.8
    keep = int((probs.cumsum(0) < 0.8).sum()) + 1
    p = sample(logits, SamplingParams(top_p=0.8), g)
    assert set(p.tolist()) == set(range(keep))
    # temperature: empirical frequencies follow softmax(logits / T)
    t = sample(logits, SamplingParams(temperature=2.0), g)
    freq = torch.bincount(t, minlength=6).float() / len(t)
    torch.testing.assert_close(freq, (logits[0] / 2).softmax(-1), atol=0.03, rtol=0)
    assert torch.equal(sample(logits[:5], SamplingParams(top_k=1), g), torch.zeros(5, dtype=torch.long))


def test_temperature_top_k_and_top_p_compose():
    """--temperature with --top-k and --top-p (the CLI passes all three): the logits are scaled first, the
    top-k cut, then the top-p prefix taken of the scaled, cut distribution; none of them is skipped."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(6000, 1)
    scaled = logits[0] / 2.0  # temperature 2
    probs = scaled[:4].softmax(-1)  # top_k 4: [.409, .248, .193, .150]
    keep = int(((probs.cumsum(0) - probs) < 0.75).sum())  # top_p 0.75: the first 3 (0.85 >= 0.75)
    expected = probs[:keep] / probs[:keep].sum()
    assert keep == 3  # at temperature 1 top_p would keep 2, without top_p top_k keeps 4
    g = torch.Generator().manual_seed(0)
    drawn = sample(logits, SamplingParams(temperature=2.0, top_k=4, top_p=0.75), g)
    freq = torch.bincount(drawn, minlength=6).float() / len(drawn)
    assert set(drawn.tolist()) == set(range(keep))
    torch.testing.assert_close(freq[:keep], expected, atol=0.03, rtol=0)


@pytest.mark.parametrize("temperature", [1e-40, 1e-46, 1e-300])
@torch.no_grad()
def test_a_tiny_temperature_is_greedy(temperature):
    """logits / temperature overflows fp32; the limit of sampling as the temperature falls is greedy."""
    logits = torch.tensor([[40.0, 39.5, -3.0], [-50.0, 2.0, 1.0], [0.1, 0.2, 0.3]])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert sample(logits, SamplingParams(temperature=temperature), g).tolist() == [0, 1, 2]
    assert sample(logits, SamplingParams(temperature=temperature, top_k=2, top_p=0.5), g).tolist() == [0, 1, 2]
    model = tiny_model().double()
    prompts = [[3, 17, 99], [42]]
    res = generate(model, prompts, SamplingParams(max_new_tokens=5, temperature=temperature, seed=1))
    assert res.tokens == [naive_greedy(model, p, 5) for p in prompts]


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": -2}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"top_k": VOCAB + 1}, "exceeds the vocabulary"),
    ],
)
def test_invalid_sampling_parameters(kw, msg):
    with pytest.raises(ValueError, match=msg):
        generate(tiny_model(), [[1, 2]], SamplingParams(**kw))


def test_top_k_of_the_whole_vocabulary_is_accepted():
    """top_k may be the vocabulary size (it keeps every token): only a larger one is refused."""
    res = generate(tiny_model(), [[1, 2]], SamplingParams(max_new_tokens=2, top_k=VOCAB, seed=0))
    assert len(res.tokens[0]) == 2


def test_invalid_prompts():
    model = tiny_model()
    with pytest.raises(ValueError, match="prompt 1: empty"):
        generate(model, [[1], []], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="token id 999"):
        generate(model, [[1, 999]], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="exceeds max_length=8"):
        generate(model, [[1] * 6], SamplingParams(max_new_tokens=3), max_length=8)


def test_cli_streams_text_and_reports_errors(tmp_path, capsys):
    import sentencepiece as spm

    tok = train_tokenizer(tmp_path)
    model = tiny_model()
    exp = save_native(model, str(tmp_path / "exp"), str(tok))
    assert main(["--checkpoint", exp, "--prompt", "def add(a, b):", "--max-new-tokens", "5", "--greedy"]) == 0
    out = capsys.readouterr().out
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    prompt = ([sp.bos_id()] if sp.bos_id() >= 0 else []) + sp.encode("def add(a, b):")
    expected = generate(model, [prompt], SamplingParams(max_new_tokens=5, temperature=0), eos_id=sp.eos_id())
    assert out == sp.decode(expected.tokens[0]) + "\n" and len(out.strip()) > 0
    assert (
        main(
            [
                "--checkpoint",
                exp,
                "--prompt",
                "one two",
                "--prompt",
                "The quick",
                "--max-new-tokens",
                "4",
                "--top-k",
                "5",
                "--top-p",
                "0.9",
                "--temperature",
                "0.7",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert sorted(line[:3] for line in lines) == ["[0]", "[1]"]
    with pytest.raises(SystemExit, match="--top-p"):
        main(["--checkpoint", exp, "--prompt", "x", "--top-p", "2"])
    with pytest.raises(SystemExit, match="no such checkpoint"):
        main(["--checkpoint", str(tmp_path / "nope"), "--prompt", "x"])
    with pytest.raises(SystemExit, match="exceeds --max-length=4"):
        main(["--checkpoint", exp, "--prompt", "one two three four five", "--max-length", "4"])


def test_streamed_text_with_byte_fallback_pieces_is_the_decoded_text(tmp_path):
    """Characters outside the vocabulary are several byte pieces (data_prep's tokenizers use
    byte_fallback): the streamed text must still be exactly the decoded text."""
    import sentencepiece as spm

    (tmp_path / "c.txt").write_text("The quick brown fox jumps over the lazy dog. def add(a, b):\n" * 20)
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "c.txt"),
        model_prefix=str(tmp_path / "bf"),
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        minloglevel=2,
        num_threads=1,
    )
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "bf.model"))
    text = "fox \u65e5\u672c dog \U0001f98a"  # two 3-byte characters and a 4-byte one
    ids = sp.encode(text)
    assert sum(sp.is_byte(i) for i in ids) == 10
    for stop in (len(ids), len(ids) - 1):  # ends on a whole character / inside one (flushed at the end)
        out = []
        streamer = TextStreamer(sp, 1, out.append)
        for t in ids[:stop]:
            streamer(torch.tensor([t]), torch.tensor([False]))
        streamer(torch.tensor([0]), torch.tensor([True]))  # EOS
        streamer.close()
        assert "".join(out) == sp.decode(ids[:stop]) + "\n"
    assert "".join(out).startswith("fox \u65e5\u672c dog ")


def argv_of(checkpoint, prompts_file):
    return ["--checkpoint", str(checkpoint), "--prompts-file", str(prompts_file)]


def test_cli_generates_a_prompts_file_in_batches_of_batch_size(tmp_path, capsys, monkeypatch):
    """--batch-size bounds the prompts decoded together; each output keeps its prompt's index and text,
    the same as from one batch."""
    import sentencepiece as spm

    import retnet_train.inference.generate as generate_module

    tok = train_tokenizer(tmp_path)
    model = tiny_model()
    exp = save_native(model, str(tmp_path / "exp"), str(tok))
    texts = ["one two", "The quick brown fox", "def add(a, b):", "seven", "A retentive network"]
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(texts[:2]) + "\n\n" + "\n".join(texts[2:]) + "\n")
    batches = []
    make_decoder = generate_module.make_decoder
    monkeypatch.setattr(generate_module, "make_decoder", lambda m, b, n: batches.append(b) or make_decoder(m, b, n))

    def run(*options):
        assert main([*argv_of(exp, prompts_file), "--max-new-tokens", "6", *options]) == 0
        return dict(line.split(" ", 1) for line in capsys.readouterr().out.splitlines())

    by_index = run("--greedy", "--batch-size", "2")
    assert batches == [2, 2, 1]
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    for i, text in enumerate(texts):
        prompt = [sp.bos_id()] + sp.encode(text)
        expected = generate(model, [prompt], SamplingParams(max_new_tokens=6, temperature=0), eos_id=sp.eos_id())
        assert by_index[f"[{i}]"] == sp.decode(expected.tokens[0])
    batches.clear()
    assert run("--greedy", "--batch-size", "5") == by_index and batches == [5]
    # sampling: each prompt draws from its own generator (the seed and its index): any batch size samples
    # the same text for it, and another seed other text
    sampled = run("--temperature", "0.8", "--batch-size", "2")
    assert (
        run("--temperature", "0.8", "--batch-size", "5") == sampled == run("--temperature", "0.8", "--batch-size", "1")
    )
    assert run("--temperature", "0.8", "--seed", "1") != sampled
    with pytest.raises(SystemExit, match="--batch-size: must be >= 1, got 0"):
        main([*argv_of(exp, prompts_file), "--batch-size", "0"])
    # errors name the prompt's line (line 3 is blank and skipped)
    lengths = [1 + len(sp.encode(t)) for t in texts]
    too_long = next(i for i, n in enumerate(lengths) if n > lengths[0])
    line = [1, 2, 4, 5, 6][too_long]
    label = rf"prompt {too_long} \(--prompts-file {prompts_file} line {line}\)"
    with pytest.raises(SystemExit, match=f"error: {label}: .* exceeds --max-length="):
        main([*argv_of(exp, prompts_file), "--max-new-tokens", "1", "--max-length", str(lengths[0] + 1)])
    assert capsys.readouterr().out == ""  # checked before anything is generated


@pytest.mark.parametrize("seed", [2**63, 99999999999999999999, -(2**70)])
def test_any_integer_seed_samples_repeatably(seed):
    """--seed takes any integer (argparse's int is unbounded): each prompt's generator seed is taken modulo
    2^64, as torch takes a negative one, so a large seed samples repeatably instead of failing in
    torch.Generator.manual_seed ("Overflow when unpacking long long"), and small seeds keep their samples."""
    model = tiny_model()
    params = SamplingParams(max_new_tokens=4, seed=seed)
    first = generate(model, [[1, 2], [3]], params).tokens
    assert generate(model, [[1, 2], [3]], params).tokens == first
    assert generate(model, [[3]], params, generator=prompt_generators(seed, 1, 1, "cpu")).tokens == first[1:]
    g = prompt_generators(-5, 0, 2, "cpu")
    assert [x.initial_seed() for x in g] == [(-5 * 1_000_003) % 2**64, (-5 * 1_000_003 + 1) % 2**64]
