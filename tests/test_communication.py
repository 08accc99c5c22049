"""Fast in-process checks of the communication layer: backend choice, errors, owner placement."""

import sys

import pytest
import tensorflow as tf

import keras_hoopt
from keras_hoopt.communication import NoCommunication, TFDistributeCommunication, make_communicator
from keras_hoopt.communication.horovod import HorovodCommunication
from keras_hoopt.communication.placement import assign_owners, inversion_cost, resolve_mode


def test_inversion_cost_counts_batched_and_split_factors():
    assert inversion_cost({"A": (10, 10), "G": (3, 3)}) == 1000 + 27
    assert inversion_cost({"F": (8, 2, 2)}) == 8 * 8  # BatchNorm: 8 channels of 2x2
    assert inversion_cost({"A": (10, 10)}, split_dim=4) == 2 * 64 + 8  # blocks 4, 4, 2


def test_owners_are_balanced_greedily_and_deterministic():
    costs = [100, 1, 60, 50, 2]
    # largest first to the least loaded: 100->0, 60->1, 50->1 (60 < 100), 2->0 (100 < 110), 1->0
    assert assign_owners(costs, 2) == [0, 0, 1, 1, 0]
    assert assign_owners(list(costs), 2) == assign_owners(costs, 2)
    assert assign_owners(costs, 1) == [0] * 5
    assert sorted(set(assign_owners([5, 5, 5, 5], 4))) == [0, 1, 2, 3]


def test_mode_resolution():
    assert resolve_mode("inverses", 1, False) == "off"
    assert resolve_mode("auto", 2, False) == "gradients"
    assert resolve_mode("auto", 2, True) == "inverses"
    assert resolve_mode("inverses", 4, False) == "inverses"


def test_backend_choice_without_workers_is_no_communication():
    strategy = tf.distribute.get_strategy()
    assert isinstance(make_communicator("auto", strategy), NoCommunication)
    assert isinstance(make_communicator("tf.distribute", strategy), NoCommunication)
    assert isinstance(make_communicator("none", strategy), NoCommunication)


def test_horovod_with_a_multi_replica_strategy_is_refused():
    class TwoReplicas:
        num_replicas_in_sync = 2

    with pytest.raises(ValueError, match="reduce twice"):
        make_communicator("horovod", TwoReplicas())
    assert isinstance(make_communicator("tf.distribute", TwoReplicas()), TFDistributeCommunication)


@pytest.mark.parametrize("key, value", [("communication", "mpi"), ("model_parallel", "sometimes")])
def test_bad_distribution_arguments_name_the_parameter(key, value):
    with pytest.raises(ValueError, match=f"`{key}`.*{value}.*Accepted"):
        keras_hoopt.SPNGD(**{key: value})


def test_distribution_arguments_round_trip_through_config():
    optimizer = keras_hoopt.KFAC(communication="none", model_parallel="gradients")
    clone = keras_hoopt.KFAC.from_config(optimizer.get_config())
    assert (clone.communication, clone.model_parallel) == ("none", "gradients")


def test_missing_horovod_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "horovod", None)
    monkeypatch.setitem(sys.modules, "horovod.tensorflow", None)
    with pytest.raises(ImportError, match="install_horovod.sh"):
        HorovodCommunication()


def test_single_process_horovod_collectives_are_identities():
    comm = HorovodCommunication()  # horovod is installed by the README's install command
    assert comm.num_workers == 1 and comm.worker_id() == 0
    x = tf.constant([1.0, 2.0])
    assert comm.all_reduce([x], "mean", what="x")[0].numpy().tolist() == [1.0, 2.0]
    assert comm.all_gather(x, [2]).numpy().tolist() == [1.0, 2.0]
    assert [c.what for c in comm.plan] == ["x", ""]


def test_communication_summary_of_one_process_sends_nothing_and_counts_its_inversions():
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh", name="h"),
                              keras.layers.Dense(2, name="out")])
    optimizer = keras_hoopt.KFAC(learning_rate=0.1, damping=1e-2, inverse_update_interval=2, step_size="fixed", fisher="empirical")
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).normal(size=(40, 5)).astype("float32")
    model.fit(x, (x[:, 0] > 0).astype("int32"), batch_size=8, epochs=1, verbose=0)
    summary = optimizer.communication_summary()
    assert summary["backend"] == "none" and summary["workers"] == 1 and summary["model_parallel"] == "off"
    assert summary["owners"] == {"h": -1, "out": -1}
    assert summary["collectives"] == [] and summary["bytes_sent"] == 0 and summary["bytes_per_step"] == 0.0
    # 5 steps, inverses every 2nd: steps 0, 2, 4, two factors per layer
    assert summary["inversions_here"] == 3 * 2 * 2
    assert summary["inversions_here"] == sum(
        s["inversions"] for row in optimizer.curvature_summary() for s in row["statistics"].values())
    assert keras_hoopt.KFAC().communication_summary() == {}  # not built yet
