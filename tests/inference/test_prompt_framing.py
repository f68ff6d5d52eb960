"""Prompts start as the model's training documents started (inference/framing.py): [BOS] + tokens after
`BOS doc EOS` shards (--bos), tokens alone (or [EOS] then a document start) after `doc EOS` shards, and
the tokenizer's BOS when the checkpoint does not say. Checked on the ids the model is fed."""

import json

import pytest
import torch
from gen_fixtures import VOCAB, require_lm_eval, tiny_config, tiny_model, train_tokenizer, write_deepspeed_checkpoint

from retnet_train.inference.errors import CheckpointError
from retnet_train.inference.export import main as export_main
from retnet_train.inference.framing import FRAMING_KEY
from retnet_train.inference.generate import generate
from retnet_train.inference.generate import main as generate_main
from retnet_train.inference.load import load_model
from retnet_train.inference.native import save_native
from retnet_train.inference.sampling import SamplingParams
from retnet_train.model import RetNetForCausalLM

BOS, EOS = 1, 2  # sentencepiece's defaults, as gen_fixtures' tokenizer has them
GREEDY = SamplingParams(max_new_tokens=4, temperature=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tokenizer, a tiny RetNet and its exports recording each framing (absent: an older export)."""
    d = tmp_path_factory.mktemp("framing")
    tok = str(train_tokenizer(d))
    model = tiny_model("retnet").double()
    exports = {
        name: save_native(model, str(d / name), tok, extra={} if value == "absent" else {FRAMING_KEY: value})
        for name, value in (("bos", True), ("plain", False), ("old", "absent"))
    }
    import sentencepiece as spm

    return tok, model, exports, spm.SentencePieceProcessor(model_file=tok)


@pytest.fixture
def fed(monkeypatch):
    """(input_ids, resets) of every call of RetNet's blocks on a sequence: prefills and scoring passes."""
    calls = []
    real = RetNetForCausalLM.hidden_states

    def spy(self, input_ids, resets=None, *args, **kw):
        calls.append((input_ids.tolist(), None if resets is None else resets.tolist()))
        return real(self, input_ids, resets, *args, **kw)

    monkeypatch.setattr(RetNetForCausalLM, "hidden_states", spy)
    return calls


def run_generate(checkpoint, prompt, *options):
    argv = ["--checkpoint", checkpoint, "--prompt", prompt, "--max-new-tokens", "2", "--greedy"]
    assert generate_main([*argv, *options]) == 0


@pytest.mark.parametrize(
    "export,options,prefix",
    [
        ("bos", [], [BOS]),
        ("plain", [], []),
        ("old", [], [BOS]),  # not recorded: the tokenizer's BOS, as before the framing was recorded
        ("old", ["--prompt-prefix", "none"], []),
        ("plain", ["--prompt-prefix", "bos"], [BOS]),
        ("bos", ["--prompt-prefix", "auto"], [BOS]),
    ],
)
def test_generate_feeds_the_prompt_as_training_documents_started(setup, fed, capsys, export, options, prefix):
    tok, model, exports, sp = setup
    run_generate(exports[export], "one two", *options)
    assert fed == [([prefix + sp.encode("one two")], None)]


@pytest.mark.parametrize("export,options", [("plain", []), ("old", ["--prompt-prefix", "none"])])
def test_an_empty_prompt_without_bos_framing_starts_from_eos(setup, fed, capsys, export, options):
    tok, model, exports, sp = setup
    run_generate(exports[export], "", *options)
    assert fed == [([[EOS]], None)]


def test_bos_framing_with_a_tokenizer_without_bos_is_an_error(setup, tmp_path):
    import sentencepiece as spm

    tok, model, *_ = setup
    (tmp_path / "c.txt").write_text(open(tok.replace("tok.model", "corpus.txt")).read())
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "c.txt"),
        model_prefix=str(tmp_path / "nobos"),
        vocab_size=VOCAB,
        bos_id=-1,
        minloglevel=2,
        num_threads=1,
    )
    exp = save_native(model, str(tmp_path / "exp"), str(tmp_path / "nobos.model"), extra={FRAMING_KEY: True})
    with pytest.raises(SystemExit, match="--prompt-prefix auto: prompts start with BOS .* the tokenizer has no BOS"):
        run_generate(exp, "one two")


def test_recorded_framing_survives_export_and_a_bad_value_is_named(tmp_path, setup, fed, capsys):
    tok, model, exports, sp = setup
    cfg = tiny_config()
    client = {"config": {"model": cfg, "data": {"tokenizer": tok}}, FRAMING_KEY: False}
    write_deepspeed_checkpoint(tmp_path / "ckpt", cfg, 0, client, steps=1)
    assert load_model(str(tmp_path / "ckpt")).documents_start_with_bos is False
    assert export_main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "exp")]) == 0
    config = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert config[FRAMING_KEY] is False
    assert load_model(str(tmp_path / "exp")).documents_start_with_bos is False
    fed.clear()  # the checkpoint's training steps
    run_generate(str(tmp_path / "exp"), "one two")
    assert fed == [([sp.encode("one two")], None)]
    # an export of a model whose framing is not known records that (null), and loads as not known
    assert export_main(["--checkpoint", exports["old"], "--out", str(tmp_path / "old")]) == 0
    assert json.loads((tmp_path / "old" / "config.json").read_text())[FRAMING_KEY] is None
    assert load_model(str(tmp_path / "old")).documents_start_with_bos is None
    (tmp_path / "exp" / "config.json").write_text(json.dumps({**config, FRAMING_KEY: "yes"}))
    with pytest.raises(CheckpointError, match=r"exp/config.json: documents_start_with_bos must be true, false or null"):
        load_model(str(tmp_path / "exp"))


@pytest.mark.parametrize("arch", ["retnet", "transformer"])
@torch.no_grad()
def test_a_document_start_after_eos_hides_what_came_before(arch):
    """As in training (document_masking): what follows an EOS in a prompt does not see the EOS or what is
    before it, so [.., EOS] + p generates what p alone does; without document masking it is seen."""
    model = tiny_model(arch, document_masking=True).double()
    prompts = [[3, 17, 99, 4, 5], [42, 8]]
    alone = generate(model, prompts, GREEDY).tokens
    after_eos = generate(model, [[EOS] + prompts[0], [9, 9, 9, EOS] + prompts[1]], GREEDY, document_end_id=EOS)
    assert after_eos.tokens == alone
    assert generate(model, [[EOS] + p for p in prompts], GREEDY).tokens != alone  # the check can fail
    model.config.document_masking = False  # trained so: the EOS was seen, and is
    with_eos = [[EOS] + p for p in prompts]
    assert generate(model, with_eos, GREEDY, document_end_id=EOS).tokens == generate(model, with_eos, GREEDY).tokens


def greedy_with_resets(model, prompt, n, document_end):
    """n greedy tokens by full forwards, each token after document_end a document start (the training
    loader's doc_starts)."""
    ids = list(prompt)
    for _ in range(n):
        starts = [[False] + [t == document_end for t in ids[:-1]]]
        ids.append(int(model(torch.tensor([ids]), doc_starts=torch.tensor(starts)).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("arch", ["retnet", "transformer"])
@torch.no_grad()
def test_the_token_after_a_prompts_last_or_a_generated_eos_starts_a_document(arch):
    """A document end as a prompt's last token (the empty prompt's [EOS]) or generated (no stop at it): the
    next token starts a document as in training, in the decode step as in the prefill."""
    torch.manual_seed(1)  # weights whose greedy tokens change with the reset (checked last)
    model = tiny_model(arch, document_masking=True).double()
    params = SamplingParams(max_new_tokens=6, temperature=0)
    prompts = [[EOS], [5, 9, EOS], [3, 17, 99, 4]]
    expected = [greedy_with_resets(model, p, 6, EOS) for p in prompts]
    assert generate(model, prompts, params, document_end_id=EOS).tokens == expected
    end = generate(model, [prompts[2]], params).tokens[0][1]  # row 2's second token, as a document end
    expected = [greedy_with_resets(model, p, 6, end) for p in prompts]
    assert generate(model, prompts, params, document_end_id=end).tokens == expected
    assert expected[2] != generate(model, [prompts[2]], params).tokens[0]  # the reset changes what follows


def test_generate_starts_a_document_after_the_empty_prompts_eos(setup, tmp_path, capsys):
    """The generate command: the token after an EOS starts a document, so what follows the empty prompt's
    [EOS] (`doc EOS` framing) is generated as the first tokens of a training document."""
    tok, _, _, sp = setup
    torch.manual_seed(1)  # weights whose greedy tokens change with the reset (checked last)
    model = tiny_model("retnet")
    exp = save_native(model, str(tmp_path / "exp"), tok, extra={FRAMING_KEY: False})
    assert generate_main(["--checkpoint", exp, "--prompt", "", "--max-new-tokens", "6", "--greedy", "--jsonl"]) == 0
    completion = json.loads(capsys.readouterr().out)["completion"]
    params = SamplingParams(max_new_tokens=6, temperature=0)
    expected = generate(model, [[EOS]], params, eos_id=EOS, document_end_id=EOS).tokens[0]
    assert completion == sp.decode(expected)
    assert expected != generate(model, [[EOS]], params, eos_id=EOS).tokens[0]


def adapter(setup, framing, max_length=64):
    from retnet_train.inference.lm_eval_adapter import RetNetTrainLM

    tok, model, *_ = setup
    return RetNetTrainLM(model, tok, max_length=max_length, batch_size=4, documents_start_with_bos=framing)


def after_eos(rows):
    """The training loader's doc_starts: True where the previous token is EOS."""
    return [[False] + [t == EOS for t in row[:-1]] for row in rows]


@pytest.mark.parametrize("framing,prefix", [(True, BOS), (False, EOS), (None, BOS)])
def test_adapter_contexts_start_as_training_documents_did(setup, fed, framing, prefix):
    require_lm_eval()
    from lm_eval.api.instance import Instance

    tok, model, _, sp = setup
    lm = adapter(setup, framing)
    assert lm.prefix_id == prefix
    [(score, _)] = lm.loglikelihood([Instance("loglikelihood", {}, ("one two", " three"), 0)])
    ctx, cont = lm._encode_pair("one two", " three")
    row = [prefix] + ctx + cont[:-1]
    starts = after_eos([row]) if framing is False else None
    assert fed == [([row], starts)]
    doc_starts = None if starts is None else torch.tensor(starts)
    with torch.no_grad():
        logp = model(torch.tensor([row]), doc_starts=doc_starts).logits[0, -len(cont) :].log_softmax(-1)
    assert score == pytest.approx(float(logp.gather(-1, torch.tensor(cont)[:, None]).sum()), rel=1e-6)
    if framing is False:  # the document start changes the score: the check above can fail
        with torch.no_grad():
            plain = model(torch.tensor([row])).logits[0, -len(cont) :].log_softmax(-1)
        assert score != pytest.approx(float(plain.gather(-1, torch.tensor(cont)[:, None]).sum()), rel=1e-4)


@pytest.mark.parametrize("framing,prefix", [(True, BOS), (False, EOS), (None, BOS)])
def test_adapter_rolling_windows_and_generation_use_the_same_prefix(setup, fed, framing, prefix):
    require_lm_eval()
    from lm_eval.api.instance import Instance

    tok, model, _, sp = setup
    text = "one two three four five six seven eight nine ten"
    toks = sp.encode(text)
    adapter(setup, framing, max_length=6).loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    rows = [row for ids, _ in fed for row in ids]
    assert [prefix] + toks[:5] in rows  # the first window
    assert all(resets == (after_eos(ids) if framing is False else None) for ids, resets in fed)
    fed.clear()
    until = {"until": ["\n\n"], "max_gen_toks": 3}
    [out] = adapter(setup, framing).generate_until([Instance("generate_until", {}, ("one two", until), 0)])
    prompt = [prefix] + sp.encode("one two")
    # the prefill: the row's first token starts a document, and so does the token after an EOS prefix
    assert fed == [([prompt], [[True, True] + [False] * (len(prompt) - 2)] if framing is False else None)]
    if framing is False:  # the EOS and its document start leave what the context alone generates
        assert out == sp.decode(generate(model, [prompt[1:]], SamplingParams(3, temperature=0), eos_id=EOS).tokens[0])


@pytest.mark.parametrize(
    "export,options,prefix",
    [("plain", [], EOS), ("bos", [], BOS), ("old", [], BOS), ("old", ["--prompt-prefix", "none"], EOS)],
)
def test_evaluate_builds_the_adapter_with_the_framing(setup, monkeypatch, capsys, export, options, prefix):
    require_lm_eval()
    import retnet_train.inference.lm_eval_adapter as adapter_module
    from retnet_train.inference.evaluate import main as evaluate_main

    built = []
    monkeypatch.setattr(adapter_module, "simple_evaluate", lambda lm, *a, **kw: built.append(lm) or {})
    assert evaluate_main(["--checkpoint", setup[2][export], "--tasks", "any", *options]) == 0
    assert (built[0].prefix_id, built[0].starts_after_prefix) == (prefix, prefix == EOS)


def test_lm_eval_model_args_take_the_checkpoints_framing_unless_given(setup):
    require_lm_eval()
    from retnet_train.inference.lm_eval_adapter import RetNetTrainLM

    plain = setup[2]["plain"]
    assert RetNetTrainLM.create_from_arg_string(f"checkpoint={plain}").prefix_id == EOS
    assert RetNetTrainLM.create_from_arg_string(f"checkpoint={plain},documents_start_with_bos=true").prefix_id == BOS
    with pytest.raises(ValueError, match="retnet-train: documents_start_with_bos must be true, false or null"):
        RetNetTrainLM.create_from_arg_string(f"checkpoint={plain},documents_start_with_bos=yes")
