"""The power sampler's parsing and summary (lines as nvidia-smi printed them on an H200 under the 1.3B step),
and the sampler's process handling with a stand-in command."""

import os
import stat
import time
from types import SimpleNamespace

import pytest
import torch

from retnet_train.bench import gpu_power
from retnet_train.bench.gpu_power import PowerSampler, parse_samples, summarize

H200_LINES = """683.1, 700.00, 1590, 1980, Active
[N/A], 700.00, 1590, 1980, Active
691.9, 700.00, 1515, 1980, Active
120.4, 700.00, 1980, 1980, Not Active
3.1, 700.00
"""


def test_parse_keeps_whole_readable_lines():
    assert parse_samples(H200_LINES) == [
        (683.1, 700.0, 1590.0, 1980.0, True),
        (691.9, 700.0, 1515.0, 1980.0, True),
        (120.4, 700.0, 1980.0, 1980.0, False),
    ]


def test_summary_means_cap_share_and_energy_per_token():
    samples = parse_samples(H200_LINES)
    got = summarize(samples, tokens_per_s=65536.0, min_watts=600)
    assert got == {
        "mean_w": 687.5,
        "power_limit_w": 700.0,
        "mean_sm_mhz": 1552,
        "max_sm_mhz": 1980,
        "power_capped_share": 1.0,
        "joules_per_token": round(687.5 / 65536, 5),
        "samples": 2,
    }
    assert summarize(samples, 65536.0)["power_capped_share"] == round(2 / 3, 3)
    assert summarize([], 65536.0) is None


def test_no_sampler_without_a_gpu_or_without_nvidia_smi(monkeypatch):
    with PowerSampler(torch.device("cpu")) as power:
        pass
    assert power.samples == [] and power.process is None
    monkeypatch.setattr(gpu_power.shutil, "which", lambda name: None)
    assert PowerSampler(torch.device("cuda", 0)).command is None


@pytest.mark.skipif(os.name != "posix", reason="a shell script stands in for nvidia-smi")
def test_sampler_reads_what_the_command_printed_until_it_closes(tmp_path, monkeypatch):
    """The command gets the GPU by UUID and the query; what it printed before being stopped is read."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        '#!/bin/sh\necho "$@" > "$0.args"\nwhile true; do echo "650.0, 700.00, 1600, 1980, Active"; sleep 0.05; done\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    props = SimpleNamespace(uuid="0123-abcd")
    monkeypatch.setattr(gpu_power.torch.cuda, "get_device_properties", lambda device: props)
    with PowerSampler(torch.device("cuda", 0), interval_ms=50, command=str(fake)) as power:
        deadline = time.monotonic() + 60
        while not (tmp_path / "nvidia-smi.args").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # (the script prints right after writing its arguments)
    args = (tmp_path / "nvidia-smi.args").read_text().split()
    assert args == [
        "--id=GPU-0123-abcd",
        f"--query-gpu={gpu_power.QUERY}",
        "--format=csv,noheader,nounits",
        "--loop-ms=50",
    ]
    assert (
        power.process.poll() is not None
        and power.samples
        and all(s == (650.0, 700.0, 1600.0, 1980.0, True) for s in power.samples)
    )
