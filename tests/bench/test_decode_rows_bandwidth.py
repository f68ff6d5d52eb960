"""The decode benchmark's weight-read bound is that of one torch device: on an MI250X a device is one of
the package's two GCDs (launch/README.md), each with half the package's 3.2 TB/s of HBM bandwidth."""

import pytest

from retnet_train.bench import decode_rows


@pytest.mark.parametrize("name", ["AMD Instinct MI250X", "AMD Instinct MI250X / MI250"])
def test_an_mi250x_device_reads_its_weights_at_one_gcds_bandwidth(monkeypatch, name):
    assert decode_rows.hbm_bandwidth(name) == 1.6e12
    monkeypatch.setattr(decode_rows.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(decode_rows.torch.cuda, "get_device_name", lambda: name)
    monkeypatch.setattr(decode_rows.torch.cuda, "max_memory_allocated", lambda: 0)
    got = decode_rows.memory_over_weights(8_000_000_000, 0, 0, 0, ms_step=10.0)
    # 8 GB of weights at 1.6 TB/s: 5 ms a step (the package's 3.2 TB/s would say 2.5)
    assert got["weights_only_limit_ms"] == 5.0
    assert got["step_over_limit"] == 2.0


def test_a_mig_slice_has_no_bandwidth_bound():
    """A slice gets a share of the board's HBM bandwidth that its name does not tell, as MFU's peak."""
    assert decode_rows.hbm_bandwidth("NVIDIA H100 80GB HBM3 MIG 3g.40gb") is None
