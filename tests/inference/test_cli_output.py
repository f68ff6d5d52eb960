"""What the inference commands tell a user: stdout holds only their results (pipeable: the generated
text, evaluate's JSON line), stderr names the checkpoint read, evaluate's JSON says which weights it
measured, errors name the command-line flag, and `--tag step_N` means the trainer's step_<N, 8 digits>."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gen_fixtures import TEXTS, VOCAB, two_checkpoint_run, write_shards

from retnet_train.inference.evaluate import main as evaluate_main
from retnet_train.inference.export import main as export_main
from retnet_train.inference.generate import main as generate_main
from retnet_train.inference.load import load_model

REPO = Path(__file__).resolve().parents[2]
STEP100, STEP200 = "step_00000100", "step_00000200"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run dir in the trainer's layout with checkpoints at steps 100 and 200 (different weights),
    shards of its tokenizer, and the trained models by tag."""
    root = tmp_path_factory.mktemp("cli")
    tok, refs = two_checkpoint_run(root, (STEP100, STEP200))
    write_shards(root / "shards", tok, TEXTS * 6)
    return root, refs


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    """The command as a user runs it: a fresh process, whose stdout is what a pipe receives."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", f"retnet_train.inference.{module}", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_stdout_holds_only_the_results_of_a_deepspeed_checkpoint(run, capsys):
    """DeepSpeed logs its accelerator choice when imported (to stdout, by its own logger): it goes to
    stderr, so that `evaluate ... | jq` and `generate ... > out.txt` get the results alone."""
    root, _ = run
    ckpt = str(root / "run")
    proc = cli("evaluate", "--checkpoint", ckpt, "--data", str(root / "shards"), "--seq-len", "16")
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == 1 and results[0]["validation"]["tokens"] > 0
    gen = ["--checkpoint", ckpt, "--prompt", "one two", "--prompt", "def add", "--max-new-tokens", "4", "--greedy"]
    proc = cli("generate", *gen)
    assert generate_main(gen) == 0
    assert proc.stdout == capsys.readouterr().out  # the two tagged texts, nothing else
    assert sorted(line[:3] for line in proc.stdout.splitlines()) == ["[0]", "[1]"]


def test_stderr_and_the_results_name_the_checkpoint_read(run, tmp_path, capsys):
    root, _ = run
    chosen = root / "run" / "checkpoints" / STEP200
    common = ["--data", str(root / "shards"), "--seq-len", "16"]
    for ckpt in (root / "run", root / "run" / "checkpoints"):
        assert evaluate_main(["--checkpoint", str(ckpt), *common]) == 0
        out, err = capsys.readouterr()
        assert f"using checkpoint {chosen}\n" in err  # nothing was skipped, and the line is there
        res = json.loads(out)
        assert (res["checkpoint"], res["checkpoint_path"]) == (str(ckpt), str(chosen))
        assert (res["checkpoint_tag"], res["checkpoint_step"]) == (STEP200, 200)
    # an export's results name the checkpoint it was exported from
    assert export_main(["--checkpoint", str(root / "run"), "--tag", "step_100", "--out", str(tmp_path / "exp")]) == 0
    capsys.readouterr()
    assert evaluate_main(["--checkpoint", str(tmp_path / "exp"), *common]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["checkpoint_path"] == str(tmp_path / "exp")
    assert (res["checkpoint_tag"], res["checkpoint_step"]) == (STEP100, 100)


@pytest.mark.parametrize("tag", ["step_100", "100", STEP100])
def test_a_tag_by_its_step_number(run, tag, capsys):
    root, refs = run
    for ckpt in (root / "run", root / "run" / "checkpoints"):
        loaded = load_model(str(ckpt), tag=tag)
        assert loaded.meta["tag"] == STEP100
        for k, v in refs[STEP100].state_dict().items():
            assert torch.equal(loaded.model.state_dict()[k], v), k
    assert (
        generate_main(["--checkpoint", str(root / "run"), "--tag", tag, "--prompt", "one", "--max-new-tokens", "2"])
        == 0
    )
    assert f"using checkpoint {root / 'run' / 'checkpoints' / STEP100}\n" in capsys.readouterr().err


def test_an_unknown_step_lists_the_tags(run):
    root, _ = run
    held = rf"\(it holds {STEP100}, {STEP200}\)"
    expected = rf"error: --tag step_300: no checkpoint step_300 in {root / 'run' / 'checkpoints'} {held}"
    with pytest.raises(SystemExit, match=expected):
        generate_main(["--checkpoint", str(root / "run"), "--tag", "step_300", "--prompt", "one"])


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--top-p", "2"], r"--top-p: must be in \(0, 1\], got 2.0"),
        (["--top-p", "0"], r"--top-p: must be in \(0, 1\]"),
        (["--max-new-tokens", "0"], "--max-new-tokens: must be an integer >= 1, got 0"),
        (["--temperature", "-1"], "--temperature: must be a finite number >= 0"),
        (["--temperature", "inf"], "--temperature: must be a finite number >= 0"),
        (["--top-k", "-1"], "--top-k: must be an integer >= 0"),
        (["--top-k", str(VOCAB + 1)], f"--top-k: {VOCAB + 1} exceeds the vocabulary"),
        (["--cuda-graph", "--device", "cpu"], "--cuda-graph: needs a CUDA device"),
        (["--max-length", "4", "--max-new-tokens", "3"], "--max-new-tokens=3 exceeds --max-length=4"),
    ],
)
def test_generate_errors_name_the_flag(run, flags, message):
    root, _ = run
    with pytest.raises(SystemExit, match=rf"^error: (prompt 0 \(--prompt\): \d+ tokens \+ )?{message}"):
        generate_main(["--checkpoint", str(root / "run"), "--prompt", "one two", *flags])


def test_jsonl_gives_one_json_line_per_prompt(run, capsys):
    """--jsonl: results a program can split (a completion may hold newlines), each with its index and
    prompt, in the order the prompts finish; the completions are those of the plain output."""
    root, _ = run
    gen = ["--checkpoint", str(root / "run"), "--prompt", "one two", "--prompt", "def add", "--greedy"]
    assert generate_main([*gen, "--max-new-tokens", "6"]) == 0
    plain = capsys.readouterr().out
    assert generate_main([*gen, "--max-new-tokens", "6", "--jsonl"]) == 0
    rows = sorted((json.loads(line) for line in capsys.readouterr().out.splitlines()), key=lambda r: r["index"])
    assert [(r["index"], r["prompt"]) for r in rows] == [(0, "one two"), (1, "def add")]
    assert all(f"[{r['index']}] {r['completion']}\n" in plain for r in rows)
    assert generate_main([*gen[:4], "--max-new-tokens", "3", "--jsonl"]) == 0  # one prompt: one line too
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["index"] == 0 and row["prompt"] == "one two" and isinstance(row["completion"], str)


def test_generate_refuses_bad_prompt_input_before_loading_the_model(run, tmp_path, monkeypatch):
    """An empty prompts file and a negative --prefill-piece: refused before the checkpoint is read."""
    from retnet_train.inference import generate

    monkeypatch.setattr(generate, "_load", lambda args: pytest.fail("the model was loaded"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(SystemExit, match="has no prompts"):
        generate_main(["--checkpoint", str(run[0] / "run"), "--prompts-file", str(tmp_path / "empty.txt")])
    with pytest.raises(SystemExit, match="^error: --prefill-piece: must be >= 0"):
        generate_main(["--checkpoint", str(run[0] / "run"), "--prompt", "one", "--prefill-piece", "-1"])


@pytest.mark.parametrize("main,argv", [(generate_main, ["--prompt", "one"]), (evaluate_main, ["--tasks", "t"])])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_a_max_length_below_1_is_refused_before_the_model_loads(run, monkeypatch, main, argv, value):
    """--max-length 0 or negative: the one-line error of the other bad values, status 1, before the checkpoint is
    read (generate read the whole checkpoint first)."""
    from retnet_train.inference import evaluate, generate

    monkeypatch.setattr(generate, "_load", lambda args: pytest.fail("the model was loaded"))
    monkeypatch.setattr(evaluate, "load_from_args", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(run[0] / "run"), *argv, "--max-length", value])
    assert e.value.code == f"error: --max-length: must be >= 1, got {value}"


@pytest.mark.parametrize(
    "main,argv,line",
    [
        (
            generate_main,
            ["--prompt", "x", "--max-new-tokens", "abc"],
            "error: --max-new-tokens: invalid int value: 'abc'",
        ),
        (generate_main, ["--prompt", "x", "--prompt-prefix", "eos"], "error: --prompt-prefix: invalid choice: 'eos'"),
        (generate_main, [], "error: one of the arguments --prompt --prompts-file is required"),
        (evaluate_main, ["--data", "d", "--seq-len", "1.5"], "error: --seq-len: invalid int value: '1.5'"),
        (export_main, ["--out", "o", "--dtype", "fp8"], "error: --dtype: invalid choice: 'fp8'"),
        (export_main, ["--out", "o", "--bogus"], "error: unrecognized arguments: --bogus"),
    ],
)
def test_a_flag_argparse_refuses_is_one_line_naming_it(main, argv, line, capsys):
    """A mistyped, unknown or missing flag: one line on stderr naming the flag, as the commands' own errors
    (argparse put its whole usage first: 19 lines for generate), and argparse's status 2."""
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", "c", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(line) and err.count("\n") == 1, err


def test_exports_result_line_gives_a_tiny_models_parameter_count(tmp_path, capsys):
    """A model under a million parameters is counted exactly (it printed 0.0M), larger ones in M with one
    decimal or in B with two."""
    from gen_fixtures import tiny_model

    from retnet_train.inference.native import save_native

    model = tiny_model()
    save_native(model, str(tmp_path / "src"))
    assert export_main(["--checkpoint", str(tmp_path / "src"), "--out", str(tmp_path / "exp")]) == 0
    n = model.num_params()
    assert n < 100_000
    assert capsys.readouterr().out == f"exported native model ({n:,} parameters) to {tmp_path / 'exp'}\n"
    from retnet_train.inference.export import parameter_count

    assert [parameter_count(n) for n in (999_999, 1_000_000, 12_345_678, 999_960_000, 1_346_678_784)] == [
        "999,999",
        "1.0M",
        "12.3M",
        "1.00B",
        "1.35B",
    ]
