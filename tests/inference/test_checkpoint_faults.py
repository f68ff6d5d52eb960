"""Damaged and half-written checkpoints, bad options and bad paths at the inference entry points
(generate, export, evaluate): a one-line error naming the file or option, or, given a run dir, the
newest valid checkpoint with a note saying which newer one was skipped and why. Nothing of the
user's is overwritten."""

import json
import os
import shutil

import pytest
import torch
from file_damage import corrupt_member, overwrite_start
from gen_fixtures import tiny_model, two_checkpoint_run

from retnet_train.inference.errors import CheckpointError
from retnet_train.inference.evaluate import main as evaluate_main
from retnet_train.inference.export import main as export_main
from retnet_train.inference.generate import main as generate_main
from retnet_train.inference.load import load_model
from retnet_train.inference.native import save_native
from retnet_train.interop.fla import save_fla

STEP1, STEP2 = "step_00000001", "step_00000002"
MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_STATES = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run dir in the trainer's layout with two complete ZeRO-2 checkpoints; the models they hold."""
    root = tmp_path_factory.mktemp("faults")
    tok, refs = two_checkpoint_run(root, (STEP1, STEP2))
    return root / "run", refs, tok


@pytest.fixture
def run(trained, tmp_path):
    """A fresh copy of the run dir to damage."""
    run_dir, refs, _ = trained
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def same_weights(model, ref):
    return all(torch.equal(model.state_dict()[k], v) for k, v in ref.state_dict().items())


def test_checkpoints_without_complete_marker_are_never_used(run, tmp_path):
    for tag in (STEP1, STEP2):
        (run / "checkpoints" / tag / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match=f"checkpoints: no usable checkpoint .*{STEP2}: no COMPLETE marker"):
        load_model(str(run))
    with pytest.raises(CheckpointError, match=f"{STEP1}: no COMPLETE marker: the save was interrupted"):
        load_model(str(run / "checkpoints" / STEP1))
    for main, extra in (
        (generate_main, ["--prompt", "one"]),
        (export_main, ["--out", str(tmp_path / "exp")]),
        (evaluate_main, ["--data", str(tmp_path)]),
    ):
        with pytest.raises(SystemExit, match=f"error: .*{STEP2}: no COMPLETE marker"):
            main(["--checkpoint", str(run / "checkpoints" / STEP2), *extra])
        with pytest.raises(SystemExit, match="error: .*no usable checkpoint"):
            main(["--checkpoint", str(run), *extra])
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize("name", [MODEL_STATES, OPTIM_STATES])
def test_a_named_checkpoint_with_a_truncated_file_is_a_one_line_error(run, tmp_path, name):
    tag_dir = run / "checkpoints" / STEP2
    truncate(tag_dir / name)
    with pytest.raises(SystemExit, match=f"error: {tag_dir}: {name} is truncated or damaged"):
        generate_main(["--checkpoint", str(tag_dir), "--prompt", "one"])
    with pytest.raises(SystemExit, match=f"error: {tag_dir}: {name} is truncated or damaged"):
        export_main(["--checkpoint", str(run / "checkpoints"), "--tag", STEP2, "--out", str(tmp_path / "exp")])
    (tag_dir / name).unlink()
    if name == MODEL_STATES:
        with pytest.raises(SystemExit, match=rf"error: {tag_dir}: no \*_model_states.pt in it"):
            generate_main(["--checkpoint", str(tag_dir), "--prompt", "one"])


@pytest.mark.parametrize("name", [MODEL_STATES, OPTIM_STATES])
def test_a_checkpoint_file_damaged_at_its_start_is_named_as_damaged(run, tmp_path, name):
    """A file that is not a zip archive at all is named truncated or damaged before torch reads it; torch's
    own text asks to save with _use_new_zipfile_serialization=True for mmap, which misleads."""
    tag_dir = run / "checkpoints" / STEP2
    overwrite_start(tag_dir / name)
    expected = f"{tag_dir}: {name} is truncated or damaged \\(it does not start as a torch.save zip archive\\)$"
    with pytest.raises(CheckpointError, match=f"^{expected}"):
        load_model(str(tag_dir))
    with pytest.raises(SystemExit, match=f"^error: {expected}") as error:
        generate_main(["--checkpoint", str(tag_dir), "--prompt", "one"])
    assert "\n" not in str(error.value) and "mmap" not in str(error.value)


@pytest.mark.parametrize("name", [MODEL_STATES, OPTIM_STATES])
def test_a_checkpoint_file_with_a_corrupt_member_is_named_as_damaged(run, name):
    """Damage inside the archive, which the cheap checks let through: the file and its member are named, with
    torch's error chained (an 'internal miniz error', or the unpickler's)."""
    path = run / "checkpoints" / STEP2 / name
    corrupt_member(path, "data.pkl")
    member = f"{path.stem}/data.pkl"
    with pytest.raises(CheckpointError, match=f"^{path}: damaged \\(its member {member} is corrupt\\)$") as error:
        load_model(str(run / "checkpoints" / STEP2))
    assert error.value.__cause__ is not None


def test_a_model_states_file_in_torchs_legacy_format_is_not_called_damaged(run):
    """torch's legacy (non-zip) format cannot be memory-mapped: the error says so, not that it is damaged."""
    path = run / "checkpoints" / STEP2 / MODEL_STATES
    torch.save(torch.load(path, weights_only=False), path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=f"^{path}: in torch's legacy \\(non-zip\\) format, which cannot be"):
        load_model(str(run / "checkpoints" / STEP2))


def test_an_unknown_tag_names_the_checkpoint_directory_and_the_tags_it_holds(run, tmp_path):
    # a run dir's tags are under checkpoints/: the error names that directory, not the run dir
    expected = rf"error: --tag step_3: no checkpoint step_3 in {run / 'checkpoints'} \(it holds {STEP1}, {STEP2}\)"
    with pytest.raises(SystemExit, match=expected):
        generate_main(["--checkpoint", str(run), "--tag", "step_3", "--prompt", "one"])
    with pytest.raises(SystemExit, match=expected):
        export_main(["--checkpoint", str(run / "checkpoints"), "--tag", "step_3", "--out", str(tmp_path / "exp")])
    assert not (tmp_path / "exp").exists()


def test_a_run_dir_falls_back_to_the_newest_valid_checkpoint_and_says_why(trained, run, capsys):
    _, refs, _ = trained
    truncate(run / "checkpoints" / STEP2 / MODEL_STATES)
    loaded = load_model(str(run))
    assert loaded.meta["tag"] == STEP1 and same_weights(loaded.model, refs[STEP1])
    note = [line for line in capsys.readouterr().err.splitlines() if line.startswith("using checkpoint")]
    assert len(note) == 1 and note[0].startswith(
        f"using checkpoint {run / 'checkpoints' / STEP1}; skipped newer: "
        f"{STEP2}: {MODEL_STATES} is truncated or damaged"
    )
    # the same through the CLI, the note on stderr and the text on stdout
    assert generate_main(["--checkpoint", str(run), "--prompt", "one two", "--max-new-tokens", "2", "--greedy"]) == 0
    assert "skipped newer" in capsys.readouterr().err
    # an incomplete newest save (killed before its marker) is named as well; none skipped: the line names
    # the checkpoint alone
    (run / "checkpoints" / STEP2 / "COMPLETE").unlink()
    assert load_model(str(run)).meta["tag"] == STEP1
    assert f"skipped newer: {STEP2}: no COMPLETE marker" in capsys.readouterr().err
    shutil.rmtree(run / "checkpoints" / STEP2)
    assert load_model(str(run)).meta["tag"] == STEP1
    note = [line for line in capsys.readouterr().err.splitlines() if line.startswith("using checkpoint")]
    assert note == [f"using checkpoint {run / 'checkpoints' / STEP1}"]


def test_only_rank_0_names_the_checkpoint_it_reads(trained, run, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # the trainer's ranks each read train.init_weights
    assert load_model(str(run)).meta["tag"] == STEP2
    assert "using checkpoint" not in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    assert load_model(str(run)).meta["tag"] == STEP2
    note = [line for line in capsys.readouterr().err.splitlines() if line.startswith("using checkpoint")]
    assert note == [f"using checkpoint {run / 'checkpoints' / STEP2}"]


def test_export_never_overwrites_user_files_nor_leaves_a_partial_export(run, tmp_path):
    user_file = tmp_path / "notes.txt"
    user_file.write_text("mine")
    for flags in ([], ["--overwrite"]):
        with pytest.raises(SystemExit, match=f"error: --out: {user_file} is a file, not a directory"):
            export_main(["--checkpoint", str(run), "--out", str(user_file), *flags])
        with pytest.raises(SystemExit, match=f"error: --out: {user_file} is a file, so .* cannot be created"):
            export_main(["--checkpoint", str(run), "--out", str(user_file / "exp"), *flags])
    assert user_file.read_text() == "mine"
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "config.json").write_text("{}")
    (mixed / "data.csv").write_text("mine")
    with pytest.raises(SystemExit, match="holds files an export does not write \\(data.csv\\)"):
        export_main(["--checkpoint", str(run), "--out", str(mixed), "--overwrite"])
    assert (mixed / "config.json").read_text() == "{}"
    # a refused export (fla cannot take this model) leaves no directory and no staging files behind
    with pytest.raises(SystemExit, match="fla export refused"):
        export_main(["--checkpoint", str(run), "--out", str(tmp_path / "fla"), "--format", "fla"])
    assert sorted(os.listdir(tmp_path)) == ["mixed", "notes.txt", "run"]
    # --overwrite replaces a previous export, and an export without tokenizer drops the old one's
    out = str(tmp_path / "exp")
    assert export_main(["--checkpoint", str(run), "--out", out]) == 0
    assert "tokenizer.model" in os.listdir(out)
    model = tiny_model()
    save_native(model, str(tmp_path / "bare"))  # no tokenizer
    assert export_main(["--checkpoint", str(tmp_path / "bare"), "--out", out, "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["bare", "exp", "mixed", "notes.txt", "run"]


def test_bad_options_and_paths_are_one_line_errors(trained, run, tmp_path):
    _, _, tok = trained
    gen = ["--checkpoint", str(run), "--prompt", "one"]
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("arch: [retnet\n")
    with pytest.raises(SystemExit, match=f"error: --model-config {bad_yaml}: not valid YAML"):
        generate_main([*gen, "--model-config", str(bad_yaml)])
    bad_yaml.write_text("- retnet\n")
    with pytest.raises(SystemExit, match="expected a mapping of model keys .* got list"):
        generate_main([*gen, "--model-config", str(bad_yaml)])
    bad_yaml.write_text("arch: retnet\nd_model: 32\nwidth: 3\n")
    with pytest.raises(SystemExit, match=f"error: --model-config {bad_yaml}: .*width"):
        generate_main([*gen, "--model-config", str(bad_yaml)])
    with pytest.raises(SystemExit, match="error: --model-config: .*No such file"):
        generate_main([*gen, "--model-config", str(tmp_path / "none.yaml")])
    latin1 = tmp_path / "prompts.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(SystemExit, match=f"error: --prompts-file {latin1}: not UTF-8"):
        generate_main(["--checkpoint", str(run), "--prompts-file", str(latin1)])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="error: --device cuda: no CUDA/ROCm device visible"):
            generate_main([*gen, "--device", "cuda"])
    with pytest.raises(SystemExit, match="error: --device 'gpu0'"):
        generate_main([*gen, "--device", "gpu0"])
    with pytest.raises(SystemExit, match=f"error: --tokenizer: {tmp_path} is a directory"):
        generate_main([*gen, "--tokenizer", str(tmp_path)])
    with pytest.raises(SystemExit, match="a file; pass the directory"):
        generate_main(["--checkpoint", tok, "--prompt", "one"])
    # evaluate checks where its results go before it loads and runs anything
    with pytest.raises(SystemExit, match=f"error: --output: {tmp_path} is a directory"):
        evaluate_main(["--checkpoint", str(tmp_path / "missing"), "--data", str(tmp_path), "--output", str(tmp_path)])
    with pytest.raises(SystemExit, match="--max-sequences: must be >= 1"):
        evaluate_main(["--checkpoint", str(run), "--data", str(tmp_path), "--max-sequences", "0"])


def test_damaged_export_dirs_are_named(tmp_path):
    out = tmp_path / "exp"
    save_native(tiny_model(), str(out))
    truncate(out / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"{out / 'model.safetensors'}: cannot be read"):
        load_model(str(out))
    (out / "config.json").write_text(json.dumps(["not", "a", "mapping"]))
    with pytest.raises(CheckpointError, match="not a retnet-train export \\(format=None\\)"):
        load_model(str(out))
    (out / "config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(CheckpointError, match=f"{out / 'config.json'}: cannot read"):
        load_model(str(out))


def test_overwrite_replaces_only_a_previous_export(run, tmp_path):
    """--overwrite on files of an export's names that no export wrote (a Hugging Face model's config.json,
    model.safetensors and tokenizer.model; a lone tokenizer) is refused and leaves them as they were; a
    previous fla export is replaced."""
    files = {"config.json": '{"model_type": "llama"}', "model.safetensors": "weights", "tokenizer.model": "pieces"}
    for name, present in (("hf", files), ("tok", {"tokenizer.model": "pieces"})):
        theirs = tmp_path / name
        theirs.mkdir()
        for file, text in present.items():
            (theirs / file).write_text(text)
        with pytest.raises(SystemExit, match=f"error: --out: {theirs} is not a previous export"):
            export_main(["--checkpoint", str(run), "--out", str(theirs), "--overwrite"])
        assert {file: (theirs / file).read_text() for file in present} == present
    fla = tmp_path / "fla"
    save_fla(
        tiny_model(
            norm="rmsnorm", ffn_type="glu", activation="silu", normalize_retention=False, rotary_base=10000 ** (7 / 8)
        ),
        fla,
    )
    assert export_main(["--checkpoint", str(run), "--out", str(fla), "--overwrite"]) == 0
    assert json.loads((fla / "config.json").read_text())["format"] == "retnet-train"


def test_a_float16_export_of_weights_beyond_its_range_is_refused(tmp_path):
    """--dtype float16 would store a weight above 65504 as inf: refused naming the weight, nothing written;
    bfloat16 holds it."""
    model = tiny_model()
    with torch.no_grad():
        model.norm.weight[3] = -1e5
    save_native(model, str(tmp_path / "src"))
    out = tmp_path / "fp16"
    with pytest.raises(SystemExit, match=r"error: norm.weight: -100000 is beyond float16's range \(\+-65504\)"):
        export_main(["--checkpoint", str(tmp_path / "src"), "--out", str(out), "--dtype", "float16"])
    assert sorted(os.listdir(tmp_path)) == ["src"]
    assert export_main(["--checkpoint", str(tmp_path / "src"), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert load_model(str(out)).model.norm.weight[3] == -99840  # bfloat16's nearest
