"""The GPU benchmarks' pure parts, on CPU: kernel categories and shares, the FLOP count."""
from types import SimpleNamespace

import pytest

from retnet_train.bench.retention_kernels import chunkwise_flops
from retnet_train.bench.train_throughput import time_breakdown, top_kernels


class FakeProfile:
    def __init__(self, rows):
        self.rows = [SimpleNamespace(key=k, device_time_total=us, count=n) for k, us, n in rows]

    def key_averages(self):
        return self.rows


ROWS = [
    ("nvjet_sm90_tst_256x128_gemm", 500.0, 10),
    ("chunk_simple_gla_fwd_kernel_o", 200.0, 4),
    ("triton_per_fused_native_layer_norm_0", 100.0, 8),
    ("multi_tensor_apply_kernel<adam>", 100.0, 1),
    ("triton_poi_fused_add_mul_3", 100.0, 8),
    ("aten::mm", 9999.0, 10),  # a CPU-side op row: no kernel, not counted by top_kernels
]
PROFILE = FakeProfile(ROWS)


def test_time_breakdown_categories_sum_to_one():
    shares = time_breakdown(FakeProfile(ROWS[:5]))
    assert shares == {"gemm": 0.5, "retention": 0.2, "norm": 0.1, "optimizer": 0.1, "elementwise_other": 0.1}


def test_top_kernels_skips_aten_rows_and_orders_by_time():
    top = top_kernels(PROFILE, n=2)
    assert [row[2] for row in top] == ["nvjet_sm90_tst_256x128_gemm", "chunk_simple_gla_fwd_kernel_o"]
    assert top[0][:2] == [0.5, 10]


def test_chunkwise_flops_counts_the_four_products():
    B, T, H, K, V, C = 1, 8, 2, 4, 6, 4
    by_hand = 2 * B * H * (T * C * K + T * C * V + T * K * V + T * K * V)  # qk^T, sv, k^T v, q S
    assert chunkwise_flops(B, T, H, K, V, C) == pytest.approx(by_hand)
