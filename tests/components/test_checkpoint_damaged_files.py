"""A checkpoint file damaged on disk at resume: passed over when a newer one is chosen, named when read.
torch's own errors for such a file mislead (save with _use_new_zipfile_serialization=True for mmap; an
'internal miniz error')."""

import pytest
import torch
from file_damage import corrupt_member, overwrite_start
from test_checkpoint_discovery import save

from retnet_train.components import checkpoint_discovery as discovery
from retnet_train.components.checkpoint import CheckpointManager, check_parts
from retnet_train.components.resume_source import resolve_resume

MODEL_STATES = "mp_rank_00_model_states.pt"
NOT_A_ZIP = "truncated or damaged (it does not start as a torch.save zip archive)"


def test_a_newest_checkpoint_damaged_at_its_start_is_skipped_naming_the_file(tmp_path, capsys):
    save(tmp_path, 10)
    save(tmp_path, 20)
    overwrite_start(tmp_path / "step_00000020" / MODEL_STATES)
    assert discovery.damage(str(tmp_path), "step_00000020") == f"{MODEL_STATES} is {NOT_A_ZIP}"
    assert resolve_resume("auto", CheckpointManager(str(tmp_path), keep_last=3, rank=0)) == (
        str(tmp_path),
        "step_00000010",
    )
    assert (
        f"using checkpoint {tmp_path / 'step_00000010'}; skipped newer: step_00000020: {MODEL_STATES} is {NOT_A_ZIP}"
        in capsys.readouterr().out
    )


def test_a_legacy_format_file_is_not_called_damaged_by_discovery(tmp_path):
    tag_dir = save(tmp_path, 10)
    torch.save({"step": 10}, tag_dir / "rng_rank0.pt", _use_new_zipfile_serialization=False)
    assert discovery.damage(str(tmp_path), "step_00000010") is None


@pytest.mark.parametrize(
    "damage, why",
    [
        (overwrite_start, NOT_A_ZIP),
        (lambda path: corrupt_member(path, "data.pkl"), "damaged (its member mp_rank_00_model_states/data.pkl is"),
        (lambda path: corrupt_member(path, "byteorder"), "damaged (its member mp_rank_00_model_states/byteorder is"),
    ],
)
def test_resume_names_a_model_states_file_torch_cannot_read(tmp_path, damage, why):
    """A file damaged after the checkpoint was chosen (or where the checks before do not look) is named with
    what it shows, torch's error chained, in the inference loader's words."""
    tag_dir = save(tmp_path, 10)
    damage(tag_dir / MODEL_STATES)
    with pytest.raises(ValueError) as error:
        check_parts((str(tmp_path), tag_dir.name), {})
    assert str(error.value).startswith(f"train.resume: {tag_dir / MODEL_STATES}: {why}")
    assert "mmap" not in str(error.value) and "miniz" not in str(error.value)
    assert error.value.__cause__ is not None


def test_a_legacy_format_model_states_file_is_said_to_be_one_at_resume(tmp_path):
    tag_dir = save(tmp_path, 10)
    torch.save({"step": 10}, tag_dir / MODEL_STATES, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match=r"in torch's legacy \(non-zip\) format, which cannot be memory-mapped"):
        check_parts((str(tmp_path), tag_dir.name), {})
