"""evaluate: validation perplexity over real shards equals the loss computed by hand; shards
of another tokenizer are refused; --tasks runs local lm-eval tasks (no download) through the adapter
(tests/inference/test_lm_eval_adapter.py holds the adapter itself)."""

import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gen_fixtures import TEXTS, eval_setup, require_lm_eval, write_shards

from retnet_train.inference.evaluate import main, parse_data, perplexity


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return eval_setup(tmp_path_factory)


def test_perplexity_matches_hand_computation(setup, capsys):
    d, tok, model, exp, tokens = setup
    assert main(["--checkpoint", exp, "--data", str(d / "shards"), "--seq-len", "16", "--batch-size", "3"]) == 0
    res = json.loads(capsys.readouterr().out)["validation"]
    n = (len(tokens) - 1) // 16
    win = torch.tensor(np.stack([tokens[i * 16 : i * 16 + 17] for i in range(n)]))
    with torch.no_grad():
        ids, labels = win[:, :-1], win[:, 1:]
        starts = torch.zeros_like(ids, dtype=torch.bool)
        import sentencepiece as spm

        starts[:, 1:] = ids[:, :-1] == spm.SentencePieceProcessor(model_file=str(tok)).eos_id()
        logits = model(ids, doc_starts=starts).logits
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()
    assert res["tokens"] == n * 16
    assert (res["seq_len"], res["batch_size"], res["max_sequences"]) == (16, 3, None)
    assert res["loss"] == pytest.approx(loss, rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert res["bits_per_token"] == pytest.approx(loss / math.log(2), rel=1e-5)
    assert "sources" not in res  # one source: the loss is its own


def test_perplexity_of_each_source(setup, capsys):
    """Two --data sources: each one's numbers are those it has evaluated alone, the overall loss their
    token-weighted mean."""
    d, tok, model, exp, tokens = setup
    other = d / "other"
    write_shards(other, tok, TEXTS[::-1] * 2)
    common = ["--checkpoint", exp, "--seq-len", "16", "--batch-size", "3"]

    def validation(*data):
        assert main([*common, *(arg for spec in data for arg in ("--data", spec))]) == 0
        return json.loads(capsys.readouterr().out)["validation"]

    both = validation(f"web={d / 'shards'}", f"books={other}")
    alone = {"web": validation(str(d / "shards")), "books": validation(str(other))}
    assert list(both["sources"]) == ["books", "web"]
    for name, res in alone.items():
        assert both["sources"][name] == pytest.approx(
            {k: res[k] for k in ("loss", "perplexity", "bits_per_token", "tokens")}
        )
    web, books = both["sources"]["web"], both["sources"]["books"]
    assert both["tokens"] == web["tokens"] + books["tokens"]
    mean = (web["loss"] * web["tokens"] + books["loss"] * books["tokens"]) / both["tokens"]
    assert both["loss"] == pytest.approx(mean, rel=1e-12)


def test_perplexity_refuses_other_tokenizer_and_bad_args(setup, tmp_path):
    d, tok, model, exp, _ = setup
    write_shards(tmp_path / "other", tok, TEXTS, sha="cd" * 32)
    with pytest.raises(SystemExit, match="tokenizer sha256"):
        main(["--checkpoint", exp, "--data", str(tmp_path / "other"), "--seq-len", "8"])
    with pytest.raises(SystemExit, match="nothing to evaluate"):
        main(["--checkpoint", exp])
    with pytest.raises(SystemExit, match="--seq-len"):
        main(["--checkpoint", exp, "--data", str(d / "shards"), "--seq-len", "0"])
    with pytest.raises(ValueError, match="no tokens"):
        perplexity(model, [])
    with pytest.raises(SystemExit, match=f"error: --data val={tmp_path / 'none'}: .* is not a directory"):
        main(["--checkpoint", exp, "--data", f"val={tmp_path / 'none'}"])


def test_data_dirs_with_equals_signs_and_repeated_names(tmp_path):
    hive = tmp_path / "lang=en" / "v=2"  # '=' in a directory name (partitioned datasets)
    hive.mkdir(parents=True)
    assert parse_data([str(hive)]) == {"v=2": (str(hive), 1.0)}
    assert parse_data([f"en={hive}", str(tmp_path)]) == {"en": (str(hive), 1.0), tmp_path.name: (str(tmp_path), 1.0)}
    with pytest.raises(ValueError, match="the name 'val' is given twice"):
        parse_data([f"val={hive}", f"val={tmp_path}"])


def test_a_data_dir_without_a_name_is_named_as_the_trainer_names_it(tmp_path):
    """--data DIR is named after its directory, as the trainer's val_loss/<source> is (two of the same name: '_'
    added), so evaluate's "sources" and the run's metrics name a source alike. They were source0, source1, ..."""
    from retnet_train.components.config import TrainConfig, data_sources

    dirs = [tmp_path / "web" / "shards", tmp_path / "code", tmp_path / "old" / "shards", tmp_path / "code2/"]
    for d in dirs:
        d.mkdir(parents=True)
    paths = [str(d) for d in dirs[:3]] + [f"{dirs[3]}/"]
    cfg = TrainConfig()
    cfg.data.paths = paths
    trainer = data_sources(cfg)
    assert list(trainer) == ["shards", "code", "shards_", "code2"]
    assert parse_data(paths) == {name: (path, 1.0) for name, (path, _) in trainer.items()}


def test_unknown_lm_eval_task_is_a_one_line_error(setup, monkeypatch):
    require_lm_eval()
    import retnet_train.inference.lm_eval_adapter as adapter

    def unknown(lm, tasks, **kw):  # what lm-eval 0.4's TaskManager raises for a name it does not know
        raise KeyError(f"Spec '{tasks[0]}' is not a registered task/group/tag name or valid YAML path")

    monkeypatch.setattr(adapter, "simple_evaluate", unknown)
    _, _, _, exp, _ = setup
    with pytest.raises(SystemExit, match="error: --tasks: Spec 'no_such_task' is not a registered task"):
        main(["--checkpoint", exp, "--tasks", "no_such_task"])


def _write_tasks(directory):
    mc = [
        {"question": "one two three", "choices": ["four five", "def add"], "label": 0},
        {"question": "def add(a, b):", "choices": ["return a + b", "lazy dog"], "label": 0},
        {"question": "The quick brown", "choices": ["fox jumps", "seven eight"], "label": 0},
    ]
    (directory / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (directory / "ppl.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (directory / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {directory / "mc.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""")
    (directory / "tiny_ppl.yaml").write_text(f"""task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {directory / "ppl.jsonl"}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""")
    return mc


def test_lm_eval_local_tasks(setup, tmp_path, capsys, monkeypatch):
    require_lm_eval()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    d, tok, model, exp, _ = setup
    mc = _write_tasks(tmp_path)
    assert (
        main(
            [
                "--checkpoint",
                exp,
                "--tasks",
                "tiny_mc,tiny_ppl",
                "--include-path",
                str(tmp_path),
                "--max-length",
                "12",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)["lm_eval"]
    # expected accuracy from direct scores: sum log p(" " + choice | [BOS] + question)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok))
    correct = 0
    for doc in mc:
        scores = []
        for choice in doc["choices"]:
            ctx = sp.encode(doc["question"])
            whole = sp.encode(doc["question"] + " " + choice)
            full = torch.tensor([[sp.bos_id()] + whole])
            with torch.no_grad():
                logp = F.log_softmax(model(full[:, :-1]).logits[0], -1)
            n = len(whole) - len(ctx)
            scores.append(float(logp[-n:].gather(-1, full[0, -n:, None]).sum()))
        correct += int(np.argmax(scores) == doc["label"])
    assert res["tiny_mc"]["acc,none"] == pytest.approx(correct / len(mc))
    # the standard error as lm-eval's own command line reports it: sqrt(p (1 - p) / (n - 1)) for accuracy
    p = correct / len(mc)
    assert res["tiny_mc"]["acc_stderr,none"] == pytest.approx(math.sqrt(p * (1 - p) / (len(mc) - 1)))
    bpb = res["tiny_ppl"]["bits_per_byte,none"]
    assert math.isfinite(bpb) and bpb > 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tasks", "a,"], "error: --tasks: an empty task name in 'a,'"),
        (["--tasks", "a", "--include-path", "/no/such/dir"], "error: --include-path: /no/such/dir is not a directory"),
        (["--data", "DATA", "--limit", "5"], "error: --limit: only with --tasks (lm-eval)"),
        (["--data", "DATA", "--num-fewshot", "1"], "error: --num-fewshot: only with --tasks (lm-eval)"),
        (
            ["--data", "DATA", "--prompt-prefix", "bos"],
            "error: --prompt-prefix: only with --tasks (perplexity reads the shards as they were written)",
        ),
        (["--data", "=DATA"], "error: --data =DATA: an empty name before '='"),
        (
            ["--tasks", "a", "--bootstrap-iters", "-1"],
            "error: --bootstrap-iters: must be >= 0 (0: no standard errors), got -1",
        ),
    ],
)
def test_evaluate_flags_that_would_do_nothing_or_the_wrong_thing_are_refused(setup, flags, message):
    """Refused before loading: otherwise an empty task name would reach lm-eval, a missing --include-path
    would show only as an unknown task, --limit and --num-fewshot without --tasks would do nothing, and an
    empty source name would be used."""
    d, _, _, exp, _ = setup
    flags = [f.replace("DATA", str(d / "shards")) for f in flags]
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", exp, *flags])
    assert str(e.value) == message.replace("DATA", str(d / "shards"))


def test_tasks_without_lm_eval_fail_before_the_model_loads(setup, monkeypatch):
    """Without lm-eval, --tasks is refused before the checkpoint is read and the perplexity runs (whose
    results the error would otherwise throw away)."""
    d, _, _, _, _ = setup
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")] + ["lm_eval"]:
        monkeypatch.setitem(sys.modules, name, None)  # importing any of lm_eval: ImportError
    monkeypatch.delitem(sys.modules, "retnet_train.inference.lm_eval_adapter", raising=False)
    missing = d / "no_such_checkpoint"
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(missing), "--data", str(d / "shards"), "--tasks", "hellaswag"])
    assert str(e.value).startswith("error: --tasks: lm-evaluation-harness is not installed")
    assert "pip install -e '.[eval]'" in str(e.value)


def test_output_never_replaces_a_file_without_overwrite(setup, tmp_path, capsys):
    d, _, _, exp, _ = setup
    out = tmp_path / "results.json"
    out.write_text("earlier results\n")
    flags = ["--checkpoint", exp, "--data", str(d / "shards"), "--seq-len", "16", "--output", str(out)]
    with pytest.raises(SystemExit) as e:
        main(flags)
    assert str(e.value) == f"error: --output: {out} exists (--overwrite replaces it)"
    assert out.read_text() == "earlier results\n"
    with pytest.raises(SystemExit, match="error: --overwrite: only with --output"):
        main([*flags[:-2], "--overwrite"])
    capsys.readouterr()
    assert main([*flags, "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert out.read_text() == printed and json.loads(printed)["validation"]["seq_len"] == 16


def test_a_named_source_that_cannot_be_measured_is_an_error(setup, tmp_path):
    """Every --data source is measured, or the command fails naming it: a source left out (a validation
    split shorter than a window) would leave the overall loss another source's alone, the JSON's data
    naming both."""
    d, tok, _, exp, _ = setup
    short = tmp_path / "short"
    write_shards(short, tok, ["a b"])
    args = ["--checkpoint", exp, "--seq-len", "16", "--data", f"web={d / 'shards'}", "--data", f"short={short}"]
    with pytest.raises(SystemExit, match=f"error: --data short={short}: not measured: .*validation split"):
        main(args)


def test_no_validation_split_says_what_evaluate_can_do_instead(setup, tmp_path):
    """Perplexity needs a validation split longer than a window; the hint names evaluate's way round
    (lm-eval tasks alone), not only the trainer's."""
    _, tok, _, exp, _ = setup
    write_shards(tmp_path / "short", tok, ["a b"])
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", exp, "--seq-len", "16", "--data", str(tmp_path / "short")])
    assert str(e.value).startswith("error: no data source has a validation split of more than 16 tokens")
    assert str(e.value).endswith("or no validation (train.eval_interval=0; evaluate: --tasks without --data)")


def test_a_loss_past_the_largest_float_has_an_infinite_perplexity(monkeypatch):
    from retnet_train.components.validation import MeanLoss
    from retnet_train.inference import evaluate

    monkeypatch.setattr(evaluate, "mean_loss", lambda *a, **k: MeanLoss(800.0, 5, 1))
    out = perplexity(None, [])
    assert (out["loss"], out["perplexity"], out["tokens"]) == (800.0, math.inf, 5)
