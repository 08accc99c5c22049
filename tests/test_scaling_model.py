"""The distributed scaling model: its byte counts and owner shares, against independent arithmetic."""

import keras_hoopt.benchmarks.scaling_model as scaling
from keras_hoopt.benchmarks.workloads import WORKLOADS


def test_bytes_match_the_factor_shapes_and_the_measured_plan():
    parameters, statistic_bytes, costs = scaling.model_figures(WORKLOADS["mnist_mlp"].build())
    assert parameters == 785 * 128 + 129 * 64 + 65 * 10
    # A = (d_in+1)^2, G = d_out^2 per Dense layer, float32
    assert statistic_bytes == 4 * (785**2 + 128**2 + 129**2 + 64**2 + 65**2 + 10**2)
    # what the Horovod run's communication plan recorded for the fused all-reduce (docs/benchmarks.md)
    assert 4 * parameters + statistic_bytes == 3068228
    assert costs == [785**3 + 128**3, 129**3 + 64**3, 65**3 + 10**3]


def test_owner_shares_and_network_terms():
    costs = [8, 4, 4, 2, 2]
    rows = scaling.scaling_table(parameters=1000, statistic_bytes=8000, costs=costs, c=1.0, workers=[1, 2, 8],
                                 bandwidth=1e6, latency=1e-3)
    one, two, eight = rows
    assert one["inversion_share_s"] == one["inversion_off_s"] == 20
    assert two["inversion_share_s"] == 10 and two["busy_workers"] == 2  # {8, 2} and {4, 4, 2}
    assert eight["inversion_share_s"] == 8 and eight["busy_workers"] == 5
    assert one["all_reduce_s"] == 0 and one["gather_inverses_s"] == 0
    assert two["all_reduce_s"] == 12000 / 1e6 + 2e-3  # 2(W-1)/W * (4P + S) / B + 2(W-1) latency
    assert two["gather_gradients_s"] == 0.5 * 4000 / 1e6 + 1e-3


def test_command_prints_a_row_per_worker_count(capsys):
    assert scaling.main(["--model", "digits_mlp", "--workers", "1", "16"]) == 0
    printed = capsys.readouterr().out
    assert "| 1 |" in printed and "| 16 |" in printed and "c = " in printed
