"""The console lines of a run's start and end: what it resumed, and where its metrics and checkpoint are."""

from retnet_train.components.resume import done_line


def test_done_line_names_the_final_checkpoint():
    assert done_line(6, "runs/m/metrics.jsonl", "runs/m/checkpoints/step_00000006") == (
        "done at step 6: metrics in runs/m/metrics.jsonl, checkpoint in runs/m/checkpoints/step_00000006"
    )


def test_done_line_without_a_final_save_says_so_and_names_the_last_checkpoint():
    """checkpoint.save_at_end=false: no checkpoint at all, or an interval's (or the resumed one) before the end."""
    assert done_line(2, "runs/m/metrics.jsonl", None) == (
        "done at step 2: metrics in runs/m/metrics.jsonl, no checkpoint saved (checkpoint.save_at_end=false)"
    )
    assert done_line(6, "runs/m/metrics.jsonl", "runs/m/checkpoints/step_00000004") == (
        "done at step 6: metrics in runs/m/metrics.jsonl, no checkpoint of step 6 (checkpoint.save_at_end=false); "
        "the last one is runs/m/checkpoints/step_00000004"
    )
