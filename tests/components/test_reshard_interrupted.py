"""The conversion to a universal checkpoint (components/reshard.py) interrupted midway: the next one
starts over and removes what the killed one left, and the original files are never touched."""

import os

import pytest
from deepspeed.checkpoint import ds_to_universal

from retnet_train.components.reshard import TMP_PREFIX, UNIVERSAL, convert_to_universal


def fake_conversion(calls):
    """ds_to_universal.main writing a one-file universal checkpoint (the real one needs DeepSpeed shards)."""

    def main(args):
        calls.append(args.output_folder)
        os.makedirs(os.path.join(args.output_folder, "zero"))
        with open(os.path.join(args.output_folder, "zero", "optimizer_state.pt"), "w") as f:
            f.write("converted")

    return main


def test_a_conversion_killed_midway_leaves_nothing_behind_the_next_one(tmp_path, monkeypatch):
    tag_dir = tmp_path / "step_00000002"
    tag_dir.mkdir()
    (tag_dir / "mp_rank_00_model_states.pt").write_text("weights")
    # what a conversion SIGKILLed on another node (its pid means nothing here) left: half its output
    killed = tag_dir / f"{TMP_PREFIX}node7-4242" / UNIVERSAL / "zero" / "embed.weight"
    killed.mkdir(parents=True)
    (killed / "fp32.pt").write_bytes(b"\0" * 4096)
    calls = []
    monkeypatch.setattr(ds_to_universal, "main", fake_conversion(calls))

    final = convert_to_universal(str(tag_dir))

    assert final == str(tag_dir / UNIVERSAL) and len(calls) == 1
    assert (tag_dir / UNIVERSAL / "zero" / "optimizer_state.pt").read_text() == "converted"
    assert not [name for name in os.listdir(tag_dir) if name.startswith(TMP_PREFIX)]
    assert (tag_dir / "mp_rank_00_model_states.pt").read_text() == "weights"
    assert convert_to_universal(str(tag_dir)) == final and len(calls) == 1  # converted once


def test_a_failed_conversion_leaves_no_universal_copy(tmp_path, monkeypatch):
    tag_dir = tmp_path / "step_00000002"
    tag_dir.mkdir()

    def failing(args):
        os.makedirs(os.path.join(args.output_folder, "zero"))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ds_to_universal, "main", failing)
    with pytest.raises(OSError, match="No space left"):
        convert_to_universal(str(tag_dir))
    assert not (tag_dir / UNIVERSAL).exists()
    assert not [name for name in os.listdir(tag_dir) if name.startswith(TMP_PREFIX)]
