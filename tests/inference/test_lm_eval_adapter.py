"""The lm-eval adapter (RetNetTrainLM): rolling log-likelihoods equal direct model scores, generate_until
follows each request's settings and stop strings, and lm-eval's model_args and CLI settings build it."""

import math

import pytest
import torch
import torch.nn.functional as F
from gen_fixtures import TEXTS, eval_setup, require_lm_eval, tiny_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return eval_setup(tmp_path_factory)


def test_adapter_rolling_and_generate(setup):
    require_lm_eval()
    from lm_eval.api.instance import Instance

    from retnet_train.inference.generate import generate
    from retnet_train.inference.lm_eval_adapter import RetNetTrainLM
    from retnet_train.inference.sampling import SamplingParams

    d, tok, model, exp, _ = setup
    lm = RetNetTrainLM(model, str(tok), max_length=6, batch_size=2)
    text = TEXTS[2]
    toks = lm.tok_encode(text)
    assert len(toks) > 6  # several rolling windows
    [rolled] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])

    # lm-eval's windows (max 6 tokens, context 1), scored directly with the model
    def score(inp, targets):
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([inp])).logits[0], -1)[-len(targets) :]
        return float(logp.gather(-1, torch.tensor(targets)[:, None]).sum())

    expected, done = score([lm.prefix_id] + toks[:5], toks[:6]), 6
    while done < len(toks):
        end = done + min(len(toks) - done, 6)
        expected += score(toks[end - 7 : end - 1], toks[done:end])
        done = end
    assert rolled == pytest.approx(expected, rel=1e-5)
    assert math.isfinite(rolled) and rolled < 0
    # generate_until: greedy text cut at the stop string
    ctx = "one two"
    lm = RetNetTrainLM(model, str(tok), max_length=64)  # room for prompt + 5 new tokens
    [out] = lm.generate_until([Instance("generate_until", {}, (ctx, {"until": ["\n\n"], "max_gen_toks": 5}), 0)])
    ref = generate(model, [[lm.prefix_id] + lm.tok_encode(ctx)], SamplingParams(5, temperature=0), eos_id=lm.eos_id)
    full = lm.sp.decode(ref.tokens[0])
    assert out == full.split("\n\n")[0]
    # a batch of requests (two share their arguments, one differs) gives each request's own result
    args = [
        ("The quick", {"until": ["."], "max_gen_toks": 4}),
        ("def add(a, b):", {"until": ["."], "max_gen_toks": 4}),
        ("one", {"until": ["\n"], "max_gen_toks": 3}),
    ]
    batched = lm.generate_until([Instance("generate_until", {}, a, i) for i, a in enumerate(args)])
    single = [lm.generate_until([Instance("generate_until", {}, a, 0)])[0] for a in args]
    assert batched == single
    with pytest.raises(ValueError, match="pieces"):
        RetNetTrainLM(tiny_model("retnet", vocab_size=300), str(tok))


def test_adapter_generate_until_settings_prompts_and_stop_strings(setup, monkeypatch):
    """generate_until, with the generation itself replaced by a known completion: each request's
    gen_kwargs become its sampling settings (greedy unless do_sample, whatever the temperature), a context
    too long for max_length keeps its last tokens (those the continuation follows), and the text is cut at
    the first stop string that occurs in it, whichever place it has in `until`."""
    require_lm_eval()
    from lm_eval.api.instance import Instance

    import retnet_train.inference.lm_eval_adapter as adapter
    from retnet_train.inference.generate import GenerationResult
    from retnet_train.inference.sampling import SamplingParams

    d, tok, model, exp, _ = setup
    lm = adapter.RetNetTrainLM(model, str(tok), max_length=8, max_gen_toks=3)
    completion = lm.tok_encode("one two. three four. five")
    assert lm.sp.decode(completion) == "one two. three four. five"
    calls = []

    def fake_generate(model, prompts, params, **kw):
        calls.append((prompts, params))
        return GenerationResult([completion] * len(prompts), [False] * len(prompts), params.max_new_tokens)

    monkeypatch.setattr(adapter, "generate", fake_generate)
    ctx = "one two three four five six seven eight nine ten"
    ids = lm.tok_encode(ctx)
    assert len(ids) > 8
    sampled = {"until": [], "do_sample": True, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "max_gen_toks": 2}
    requests = [
        (ctx, {"until": [" four", "."]}),
        (ctx, {"until": "five", "do_sample": False, "temperature": 0.7}),
        (ctx, {**sampled, "seed": 3}),
    ]
    out = lm.generate_until([Instance("generate_until", {}, r, i) for i, r in enumerate(requests)])
    assert out == ["one two", "one two. three four. ", "one two. three four. five"]
    assert [params for _, params in calls] == [
        SamplingParams(max_new_tokens=3, temperature=0.0),
        SamplingParams(max_new_tokens=3, temperature=0.0),
        SamplingParams(max_new_tokens=2, temperature=0.7, top_k=5, top_p=0.9, seed=3),
    ]
    # prompt + new tokens fit max_length=8: the prompt is the context's last 8 - max_gen_toks tokens
    assert [prompts for prompts, _ in calls] == [[ids[-5:]], [ids[-5:]], [ids[-6:]]]


def test_adapter_from_lm_eval_model_args(setup):
    """`lm_eval --model retnet-train --model_args checkpoint=...` builds the adapter from a string."""
    require_lm_eval()
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    import retnet_train.inference.lm_eval_adapter  # noqa: F401  (importing registers the model name)

    d, tok, model, exp, _ = setup
    cls = get_model("retnet-train")
    lm = cls.create_from_arg_string(f"checkpoint={exp},max_length=32,dtype=float32", {"batch_size": 2, "device": "cpu"})
    direct = cls(model, str(tok), max_length=32)
    reqs = [
        Instance("loglikelihood", {}, ("one two", " three"), 0),
        Instance("loglikelihood", {}, ("def add(a, b):", " return"), 1),
    ]
    got, ref = lm.loglikelihood(reqs), direct.loglikelihood(reqs)
    assert [g[1] for g in got] == [r[1] for r in ref]
    assert [g[0] for g in got] == pytest.approx([r[0] for r in ref], rel=1e-6)
    with pytest.raises(ValueError, match="checkpoint="):
        cls.create_from_arg_string("max_length=32")


def test_adapter_from_lm_eval_cli_settings(setup, monkeypatch):
    """lm-eval's CLI builds the model with create_from_arg_obj (a dict of --model_args) and passes its own
    --batch_size as a string, --device as given (cuda:0 by default): a number is used, auto and a GPU
    that is not there are refused naming the option, settings of other models (max_batch_size) ignored."""
    require_lm_eval()
    from lm_eval.api.registry import get_model

    import retnet_train.inference.lm_eval_adapter  # noqa: F401  (importing registers the model name)

    d, tok, model, exp, _ = setup
    cls = get_model("retnet-train")
    args = {"checkpoint": str(exp), "max_length": 32, "dtype": "float32"}
    lm = cls.create_from_arg_obj(args, {"batch_size": "4", "max_batch_size": 64, "device": "cpu"})
    assert lm.batch_size == 4 and lm.max_length == 32 and lm._device == torch.device("cpu")
    with pytest.raises(ValueError, match=r"--batch_size 'auto': give a number of sequences \(auto is not supported\)"):
        cls.create_from_arg_obj(args, {"batch_size": "auto", "device": "cpu"})
    with pytest.raises(ValueError, match=r"--batch_size '0': must be >= 1"):
        cls.create_from_arg_obj(args, {"batch_size": "0", "device": "cpu"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"--device cuda:0, but no CUDA device is visible; pass --device cpu"):
        cls.create_from_arg_obj(args, {"batch_size": 2, "device": "cuda:0"})
    with pytest.raises(ValueError, match=r"--device 'gpu' is not a torch device"):
        cls.create_from_arg_obj(args, {"device": "gpu"})


def test_adapter_refuses_a_continuation_longer_than_max_length(setup):
    """Cutting the window from the left would cut into the answer itself (it crashed in a gather)."""
    require_lm_eval()
    from lm_eval.api.instance import Instance

    from retnet_train.inference.lm_eval_adapter import RetNetTrainLM

    d, tok, model, exp, _ = setup
    lm = RetNetTrainLM(model, str(tok), max_length=4)
    long_answer = Instance("loglikelihood", {}, ("one", " two three four five six seven"), 0)
    with pytest.raises(ValueError, match=r"^max_length=4 \(--max-length\): a continuation of \d+ tokens"):
        lm.loglikelihood([long_answer])


def test_adapter_names_a_continuation_that_gives_no_token_of_its_own(setup, monkeypatch):
    """A continuation the tokenizer joins to the context's last token ('def main(' + '):' is 'def', ' main',
    '():' with the sample tokenizer), or an empty one, has nothing to score: the error names the request.
    It said 'loglikelihood: empty continuation', naming neither the context nor the continuation."""
    require_lm_eval()
    from lm_eval.api.instance import Instance

    from retnet_train.inference.lm_eval_adapter import RetNetTrainLM

    d, tok, model, exp, _ = setup
    lm = RetNetTrainLM(model, str(tok), max_length=16)
    merged = {"def main(": [5, 6, 7], "def main():": [5, 6, 8]}  # a BPE merge across the boundary
    monkeypatch.setattr(lm, "tok_encode", lambda text: merged[text])
    with pytest.raises(ValueError) as refused:
        lm.loglikelihood([Instance("loglikelihood", {}, ("def main(", "):"), 0)])
    assert str(refused.value) == (
        "loglikelihood: the continuation '):' of the context 'def main(' has no token of its own: 'def main():' "
        "has no more tokens than the context (the tokenizer joins the continuation to the context's last token)"
    )
    monkeypatch.undo()
    context = "a b c d e f g h " * 9 + "the end"
    with pytest.raises(ValueError) as refused:
        lm.loglikelihood([Instance("loglikelihood", {}, (context, ""), 0)])
    assert str(refused.value) == (
        f"loglikelihood: the continuation '' of the context '...{context[-40:]}' has no token of its own: it is empty"
    )


@pytest.mark.parametrize("do_sample", [True, False])
def test_adapter_refuses_top_p_0_as_the_generate_command_does(setup, do_sample):
    """top_p 0 is refused, naming the key, as generate's --top-p 0 is (with or without --greedy); it was read
    as 1, nucleus filtering off: the opposite of a near-greedy setting."""
    require_lm_eval()
    from lm_eval.api.instance import Instance

    from retnet_train.inference.lm_eval_adapter import RetNetTrainLM

    d, tok, model, exp, _ = setup
    lm = RetNetTrainLM(model, str(tok), max_length=32)
    kwargs = {"until": ["\n"], "do_sample": do_sample, "temperature": 0.7, "top_p": 0, "max_gen_toks": 2}
    with pytest.raises(ValueError, match=r"^generate_until: generation_kwargs top_p: must be in \(0, 1\], got 0"):
        lm.generate_until([Instance("generate_until", {}, ("one two", kwargs), 0)])


def test_adapter_refuses_max_gen_toks_0_naming_the_key(setup):
    """max_gen_toks 0 (a request's, or the model's default from --model_args) is an error naming max_gen_toks,
    as lm-eval's HF backend refuses it too (transformers: max_length = context length); it failed inside
    generate, naming its max_new_tokens."""
    require_lm_eval()
    from lm_eval.api.instance import Instance

    from retnet_train.inference.lm_eval_adapter import RetNetTrainLM

    d, tok, model, exp, _ = setup
    lm = RetNetTrainLM(model, str(tok), max_length=32)
    request = Instance("generate_until", {}, ("one two", {"until": ["\n"], "max_gen_toks": 0}), 0)
    with pytest.raises(ValueError, match=r"^generate_until: generation_kwargs max_gen_toks: must be an integer >= 1"):
        lm.generate_until([request])
    with pytest.raises(ValueError, match=r"^retnet-train: max_gen_toks=0: must be >= 1"):
        RetNetTrainLM(model, str(tok), max_length=32, max_gen_toks=0)


def _recorded_generation(lm, adapter, monkeypatch):
    """Replace generate() by a stub that records each call's SamplingParams (the completion: one token)."""
    from retnet_train.inference.generate import GenerationResult

    calls = []

    def fake_generate(model, prompts, params, **kw):
        calls.append(params)
        return GenerationResult([[lm.eos_id]] * len(prompts), [True] * len(prompts), 1)

    monkeypatch.setattr(adapter, "generate", fake_generate)
    return calls


def test_adapter_reads_lm_evals_max_token_aliases(setup, monkeypatch):
    """max_new_tokens, max_tokens and max_completion_tokens set the tokens generated as max_gen_toks does,
    in lm-eval's order where several are given (normalize_gen_kwargs, which its HF backend uses); they
    were ignored, and the default 256 generated."""
    require_lm_eval()
    from lm_eval.api.instance import Instance

    import retnet_train.inference.lm_eval_adapter as adapter

    d, tok, model, exp, _ = setup
    lm = adapter.RetNetTrainLM(model, str(tok), max_length=32)
    calls = _recorded_generation(lm, adapter, monkeypatch)
    for kwargs in (
        {"max_new_tokens": 4},
        {"max_tokens": 2},
        {"max_completion_tokens": 3},
        {"max_tokens": 6, "max_new_tokens": 5},
        {"max_new_tokens": 9, "max_gen_toks": 7},
    ):
        lm.generate_until([Instance("generate_until", {}, ("one two", {"until": ["\n"], **kwargs}), 0)])
    assert [params.max_new_tokens for params in calls] == [4, 2, 3, 5, 7]
    request = Instance("generate_until", {}, ("one two", {"until": ["\n"], "max_tokens": 0}), 0)
    with pytest.raises(ValueError, match=r"^generate_until: generation_kwargs max_tokens: must be an integer >= 1"):
        lm.generate_until([request])


@pytest.mark.parametrize(
    "key, value, problem",
    [
        ("repetition_penalty", 1.3, "not supported"),
        ("num_beams", 4, "only 1 is supported"),
        ("max_length", 20, "not supported .*use max_gen_toks"),
    ],
)
def test_adapter_refuses_generation_kwargs_it_cannot_follow_naming_the_key(setup, monkeypatch, key, value, problem):
    """A setting our generate() has no counterpart for is an error naming it (it was dropped without a word;
    lm-eval's HF backend hands it to transformers' generate, which follows it); num_beams 1 is our search."""
    require_lm_eval()
    from lm_eval.api.instance import Instance

    import retnet_train.inference.lm_eval_adapter as adapter

    d, tok, model, exp, _ = setup
    lm = adapter.RetNetTrainLM(model, str(tok), max_length=32, max_gen_toks=3)
    calls = _recorded_generation(lm, adapter, monkeypatch)
    request = Instance("generate_until", {}, ("one two", {"until": ["\n"], "max_gen_toks": 2, key: value}), 0)
    with pytest.raises(ValueError, match=rf"^generate_until: generation_kwargs {key}: {problem}"):
        lm.generate_until([request])
    assert calls == []
    lm.generate_until([Instance("generate_until", {}, ("one", {"until": ["\n"], "num_beams": 1}), 0)])
    assert [params.max_new_tokens for params in calls] == [3]


def test_adapter_refuses_max_gen_toks_that_leave_no_room_for_the_prompt(setup, monkeypatch):
    """max_gen_toks >= max_length is an error naming both keys, as lm-eval's HF backend refuses it; the
    prompt was cut to its first token without a word."""
    require_lm_eval()
    from lm_eval.api.instance import Instance

    import retnet_train.inference.lm_eval_adapter as adapter

    d, tok, model, exp, _ = setup
    lm = adapter.RetNetTrainLM(model, str(tok), max_length=8)  # max_gen_toks: 256 by default
    calls = _recorded_generation(lm, adapter, monkeypatch)
    for kwargs, key in (
        ({"max_gen_toks": 8}, "generation_kwargs max_gen_toks=8"),
        ({"max_new_tokens": 9}, "generation_kwargs max_new_tokens=9"),
        ({}, r"max_gen_toks=256 \(--model_args\)"),
    ):
        request = Instance("generate_until", {}, ("one two three", {"until": ["\n"], **kwargs}), 0)
        with pytest.raises(ValueError, match=rf"^generate_until: {key}: must be less than max_length=8 "):
            lm.generate_until([request])
    assert calls == []
    lm.generate_until([Instance("generate_until", {}, ("one two three", {"until": ["\n"], "max_gen_toks": 7}), 0)])
    assert [params.max_new_tokens for params in calls] == [7]


def test_adapter_refuses_a_bad_max_length_or_max_gen_toks_before_loading(setup, tmp_path):
    """max_length of 0 or below, or a count that is not an integer, in --model_args is a one-line error
    naming the key, raised before the checkpoint is read; max_length 0 was taken, and 'abc' failed in int()."""
    require_lm_eval()
    from retnet_train.inference.lm_eval_adapter import RetNetTrainLM

    d, tok, model, exp, _ = setup
    for args, error in (
        ("max_length=0", r"max_length=0: must be >= 1"),
        ("max_length=-5", r"max_length=-5: must be >= 1"),
        ("max_length=abc", r"max_length='abc': must be an integer"),
        ("max_length=8.5", r"max_length=8.5: must be an integer"),
        ("max_gen_toks=many", r"max_gen_toks='many': must be an integer"),
    ):
        with pytest.raises(ValueError, match=rf"^retnet-train: {error}$"):
            RetNetTrainLM.create_from_arg_string(f"checkpoint={tmp_path / 'missing'},{args}")
    with pytest.raises(ValueError, match=r"^retnet-train: max_length=0: must be >= 1$"):
        RetNetTrainLM(model, str(tok), max_length=0)


@pytest.mark.parametrize(
    "key, value, kind",
    [
        ("top_p", "high", "a number"),
        ("temperature", "hot", "a number"),
        ("top_k", "five", "an integer"),
        ("top_k", 2.5, "an integer"),
        ("seed", "abc", "an integer"),
    ],
)
def test_adapter_refuses_a_generation_setting_that_is_not_a_number_naming_the_key(setup, key, value, kind):
    """A sampling setting that is not a number is a one-line error naming the key; it was float()'s or
    int()'s error, which names no key (a seed failed deep inside generation)."""
    require_lm_eval()
    from lm_eval.api.instance import Instance

    from retnet_train.inference.lm_eval_adapter import RetNetTrainLM

    d, tok, model, exp, _ = setup
    lm = RetNetTrainLM(model, str(tok), max_length=32)
    kwargs = {"until": ["\n"], "do_sample": True, "max_gen_toks": 2, key: value}
    with pytest.raises(ValueError, match=rf"^generate_until: generation_kwargs {key}: must be {kind}, got {value!r}$"):
        lm.generate_until([Instance("generate_until", {}, ("one two", kwargs), 0)])
