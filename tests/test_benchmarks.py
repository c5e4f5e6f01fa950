"""benchmarks/gpu_train.py at tiny shapes on CPU: it runs, and counts FLOPs as derived by hand."""

import pytest

from benchmarks import gpu_train


def test_gpu_train_runs_at_tiny_shapes_and_counts_model_flops():
    result = gpu_train.main(["--tiny", "--steps", "1", "--float32", "--devices", "1"])
    B, K, L, S, T = (gpu_train.TINY[k] for k in "BKLST")
    # the weight matrices of the tiny models, per layer: BERT 4H² + 2HF (H=32, F=37), BART's
    # encoder 4d² + 2dF (d=32, F=64), decoder 8d² + 2dF (F=48), 2 layers each; tied LM head dV
    query, encoder, decoder = (
        2 * (4 * 32**2 + 2 * 32 * 37),
        2 * (4 * 32**2 + 2 * 32 * 64),
        2 * (8 * 32**2 + 2 * 32 * 48),
    )
    expected = (
        6 * query * B * L + 12 * 2 * B * L * L * 32
        + 6 * encoder * B * K * S + 12 * 2 * B * K * S * S * 32
        + 6 * (decoder + 32 * 96) * B * K * T + 12 * 2 * B * K * (T * T + T * S) * 32
        + 6 * B * K * 32
    )  # fmt: skip
    assert result["flops_by_part"]["total"] == expected
    assert result["loss"] > 0 and result["steps_per_second"] > 0
    assert 0 < result["mfu"] < 1 and result["devices"] == 1  # of the suite's four
    with pytest.raises(ValueError, match="--devices 5: there are 4 devices"):
        gpu_train.main(["--tiny", "--devices", "5"])
