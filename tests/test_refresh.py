"""SP-NGD and THOR: refresh policies, skipping, limits, schedules, training."""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_hoopt
from keras_hoopt import linalg
from keras_hoopt.blocks import DenseBlock, registry
from keras_hoopt.optimizers.base import REFRESHES, LAST_REFRESH
from keras_hoopt.refresh import AdaptiveInterval, BlockView
from keras_hoopt.refresh.adaptive import next_interval, relative_change
from keras_hoopt.refresh.trace import REUSE, STOP, UPDATE, trace_decision


class _Variables:
    """Stands in for the optimizer's ``add_variable`` when driving a policy alone."""

    def add_variable(self, shape, initializer, dtype, name):
        init = keras.initializers.get(initializer)
        return keras.Variable(init(shape, dtype=dtype), dtype=dtype, name=name, trainable=False)


def _dense_block(units=2, inputs=3):
    layer = keras.layers.Dense(units, name="dense_probe")
    layer.build((None, inputs))
    return DenseBlock(layer)


def _drive(policy, block, values, steps):
    """Feed one statistic ``A`` the scripted ``values`` at the steps the policy asks for.

    Returns the interval after each refresh and the steps at which it refreshed.
    """
    names = ["A", "G"]
    policy.build(_Variables(), [BlockView(0, block, names, None)])
    counters = {n: tf.zeros(5, tf.int64) for n in names}
    current = {n: tf.eye(s[0]) for n, s in block.statistic_shapes().items()}
    intervals, refresh_steps, values = [], [], iter(values)
    for step in range(steps):
        step_t = tf.constant(step, tf.int64)
        view = BlockView(0, block, names, counters)
        due = policy.statistics_due(view, step_t)
        refreshed = {n: tf.constant(False) for n in names}
        new = dict(current)
        if bool(due["A"]):
            new["A"] = tf.constant(next(values), tf.float32)
            refreshed["A"] = tf.constant(True)
            refresh_steps.append(step)
        _, assignments = policy.after_refresh(view, current, new, refreshed, step_t, 1e-3)
        for variable, value, *when in assignments:
            if not when or when[0] is None or bool(when[0]):
                variable.assign(value)
        if bool(refreshed["A"]):
            c = counters["A"].numpy()
            c[REFRESHES] += 1
            c[LAST_REFRESH] = step
            counters["A"] = tf.constant(c)
            intervals.append(int(policy.describe(view)["intervals"]["A"]))
        current = new
    return intervals, refresh_steps


def test_relative_change_is_the_frobenius_ratio():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(2, 7, 5)).astype("float32")
    expected = np.linalg.norm(x.astype(np.float64) - y) / np.linalg.norm(y.astype(np.float64))
    assert float(relative_change(x, y)) == pytest.approx(expected, rel=1e-6)
    assert float(relative_change(x, y)) == float(tf.norm(x - y) / tf.norm(y))  # bit for bit the tf.norm ratio
    assert float(relative_change(x, np.zeros_like(y))) == np.inf


def test_interval_law_grows_holds_shrinks_and_caps():
    one = tf.constant(1, tf.int64)
    t, f = tf.constant(True), tf.constant(False)
    assert [int(v) for v in next_interval(3 * one, 2 * one, t, t, 100)] == [5, 3]  # grow: sum of last two
    assert [int(v) for v in next_interval(3 * one, 2 * one, t, f, 100)] == [3, 2]  # hold
    assert [int(v) for v in next_interval(8 * one, 5 * one, f, f, 100)] == [4, 2]  # halve
    assert [int(v) for v in next_interval(one, one, f, t, 100)] == [1, 1]  # never below 1
    assert [int(v) for v in next_interval(8 * one, 5 * one, t, t, 10)] == [10, 8]  # capped


def test_adaptive_policy_lengthens_interval_of_a_constant_statistic():
    block = _dense_block()
    x = np.diag([1.0, 2.0, 3.0, 4.0]).astype("float32")
    intervals, steps = _drive(AdaptiveInterval(0.1, max_interval=6), block, [x] * 50, 40)
    # first refresh: no history; second: similar to the last only -> hold; then Fibonacci, capped at 6.
    assert intervals[:6] == [1, 1, 2, 3, 5, 6]
    assert np.diff(steps).tolist()[:6] == [1, 1, 2, 3, 5, 6]
    assert set(intervals[5:]) == {6}


def test_adaptive_policy_shortens_interval_when_statistic_changes():
    block = _dense_block()
    rng = np.random.default_rng(0)
    stable = [np.eye(4, dtype="float32")] * 6
    changing = [np.diag(rng.uniform(1, 10, 4)).astype("float32") for _ in range(40)]
    intervals, _ = _drive(AdaptiveInterval(0.1, max_interval=50), block, stable + changing, 60)
    longest = max(intervals[:6])
    assert longest >= 5
    after = intervals[6:]
    assert after[0] == longest // 2 and after[-1] == 1  # halved on every change, down to 1


def test_adaptive_policy_holds_interval_under_slow_drift():
    # Each value is 6% away from the last but ~12% from the second-last: "hold".
    block = _dense_block()
    values = [np.eye(4, dtype="float32") * (1.06**k) for k in range(40)]
    intervals, _ = _drive(AdaptiveInterval(0.1, max_interval=50), block, values, 30)
    assert intervals == [1] * len(intervals) and len(intervals) == 30


def test_trace_decision_three_branches():
    def decide(trace, previous, o1=0.01, o2=0.001):
        return int(trace_decision(tf.constant(trace), tf.constant(previous), o1, o2))

    assert decide(5.0, 0.0) == UPDATE  # first refresh
    assert decide(1.05, 1.0) == UPDATE  # delta 0.05 > omega1
    assert decide(1.005, 1.0) == REUSE  # omega2 <= 0.005 <= omega1
    assert decide(1.0001, 1.0) == STOP  # delta < omega2
    assert decide(1.0001, 1.0, 0.01, 0.0) == REUSE  # THOR (omega2 = 0) never stops


@pytest.mark.parametrize("size,split", [(5, 8), (8, 8), (20, 6), (12, 4)])
def test_block_split_inverse_against_numpy(size, split):
    rng = np.random.default_rng(size)
    m = rng.normal(size=(40, size))
    m = (m.T @ m / 40).astype("float32")
    inverse, ok = linalg.block_diagonal_damped_inverse(tf.constant(m), 0.05, split)
    expected = np.zeros((size, size))
    for start in range(0, size, split):
        end = min(start + split, size)
        expected[start:end, start:end] = np.linalg.inv(m[start:end, start:end] + 0.05 * np.eye(end - start))
    assert bool(ok)
    np.testing.assert_allclose(inverse.numpy(), expected, rtol=1e-4, atol=1e-5)
    if size <= split:  # exact: the full damped inverse
        np.testing.assert_allclose(inverse.numpy(), np.linalg.inv(m + 0.05 * np.eye(size)), rtol=1e-4, atol=1e-5)


def _small_cnn():
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, name="c", activation="relu"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Flatten(),
            keras.layers.Dense(8, activation="relu", name="d1"),
            keras.layers.Dense(3, name="d2"),
        ]
    )


def _toy_data(n=192, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8, 8, 1)).astype("float32")
    return x, (x[:, :4].mean(axis=(1, 2, 3)) > 0).astype("int32") + (x[:, 4:].mean(axis=(1, 2, 3)) > 0)


def _train(optimizer, epochs=2, **compile_kwargs):
    keras.utils.set_random_seed(7)
    model = _small_cnn()
    model.compile(
        optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), **compile_kwargs
    )
    x, y = _toy_data()
    model.fit(x, y, batch_size=32, epochs=epochs, verbose=0, shuffle=False)
    return model


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_spngd_with_zero_threshold_equals_kfac(fisher):
    spngd = _train(keras_hoopt.SPNGD(0.05, similarity_threshold=0.0, momentum_rescaling=False, fisher=fisher, seed=3),
                   jit_compile=False)
    kfac = _train(keras_hoopt.KFAC(0.05, inverse_update_interval=1, fisher=fisher, seed=3), jit_compile=False)
    for a, b in zip(spngd.weights, kfac.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    rows = spngd.optimizer.curvature_summary()
    assert all(r["refreshes"] == 12 and r["inversions"] == 12 for r in rows)
    assert all(set(r["intervals"].values()) == {1} for r in rows)


class _CountingDenseBlock(DenseBlock):
    """A Dense block that counts, from inside the graph, how often a statistic is computed."""

    executions = {"A": 0, "G": 0}

    @classmethod
    def matches(cls, layer):
        return DenseBlock.matches(layer)

    def compute_statistic(self, name, calls, output_grads):
        value = super().compute_statistic(name, calls, output_grads)

        def bump():
            _CountingDenseBlock.executions[name] += 1
            return np.float32(0.0)

        tick = tf.numpy_function(bump, [], tf.float32)
        tick.set_shape(())
        return value + tick


@pytest.fixture
def counting_dense_block():
    _CountingDenseBlock.executions = {"A": 0, "G": 0}
    registry.register_block(_CountingDenseBlock)
    yield _CountingDenseBlock
    registry._BLOCK_TYPES.remove(_CountingDenseBlock)


def test_spngd_skips_statistics_that_are_not_due(counting_dense_block):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, name="d")])
    optimizer = keras_hoopt.SPNGD(learning_rate=1e-3, similarity_threshold=0.5, max_interval=8)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=False)
    x = np.random.default_rng(0).normal(size=(64, 6)).astype("float32")
    y = x[:, :4] * 0.5
    steps = 40
    for _ in range(steps):
        model.train_on_batch(x, y)
    row = optimizer.curvature_summary()[0]
    refreshes = {n: s["refreshes"] for n, s in row["statistics"].items()}
    # The statistic ops ran exactly as often as the statistic was refreshed, far fewer than the steps.
    assert counting_dense_block.executions == refreshes
    assert max(refreshes.values()) < steps // 3
    assert row["inversions"] < steps // 3
    assert max(row["intervals"].values()) == 8


def test_thor_trace_rule_stops_layers_and_reports_them():
    # omega2 = omega1 = 0.9: after the first refresh, any trace change below 90% stops the layer.
    optimizer = keras_hoopt.THOR(learning_rate=0.05, frequency=2, omega1=0.9, omega2=0.9, split_dim=4)
    model = _train(optimizer, epochs=2)
    rows = {r["layer"]: r for r in optimizer.curvature_summary()}
    assert all(r["stopped"] for r in rows.values())
    assert all(r["refreshes"] == 2 for r in rows.values())  # steps 0 and 2, then stopped
    assert all(r["inversions"] == 1 for r in rows.values())  # only the first refresh inverted
    assert np.isfinite(model.evaluate(*_toy_data(), verbose=0))


def test_thor_refreshes_on_its_frequency_and_splits_inverses():
    optimizer = keras_hoopt.THOR(learning_rate=0.05, frequency=4, omega1=0.0, omega2=0.0, split_dim=4)
    _train(optimizer, epochs=2)  # 12 steps: refreshes at 0, 4, 8
    rows = {r["layer"]: r for r in optimizer.curvature_summary()}
    assert all(r["refreshes"] == 3 and not r["stopped"] for r in rows.values())
    # d1's A factor is 145x145 (6*6*4 inputs + bias): its inverse is block-diagonal with 4x4 blocks.
    inverse = optimizer.inverse("d1", "A")
    assert inverse.shape == (145, 145)
    assert np.count_nonzero(inverse[:4, 4:]) == 0 and np.count_nonzero(inverse[:4, :4]) > 0


def test_polynomial_epoch_decay_and_exponential_damping():
    schedule = keras_hoopt.schedules.PolynomialEpochDecay(8.18e-3, steps_per_epoch=10, end_epoch=53, start_epoch=1, power=11)
    for step in [0, 5, 10, 100, 300, 530, 600]:
        epoch = step / 10
        progress = min(max((epoch - 1) / 52, 0.0), 1.0)
        assert float(schedule(step)) == pytest.approx(8.18e-3 * (1 - progress) ** 11, rel=1e-5, abs=1e-12)
    damping = keras_hoopt.schedules.EpochExponentialDecay(0.03, steps_per_epoch=10, decay_rate=0.5)
    assert float(damping(200)) == pytest.approx(0.03 * 0.5**2, rel=1e-6)
    restored = keras_hoopt.schedules.PolynomialEpochDecay.from_config(schedule.get_config())
    assert float(restored(123)) == pytest.approx(float(schedule(123)))
    with pytest.raises(ValueError, match="end_epoch"):
        keras_hoopt.schedules.PolynomialEpochDecay(0.1, steps_per_epoch=10, end_epoch=1, start_epoch=2)


class _Weight(keras.layers.Layer):
    """``y = w`` broadcast over the batch: one weight no curvature block handles."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(1,), initializer="zeros", name="w")

    def call(self, x):
        return x * 0.0 + self.w


def test_momentum_rescaling_when_learning_rate_drops():
    # One weight, no curvature block, fallback="momentum": the momentum-SGD part alone.
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([0], [0.1, 0.01])  # step 0: 0.1, then 0.01
    layer = _Weight()
    model = keras.Sequential([keras.Input((1,)), layer])
    optimizer = keras_hoopt.SPNGD(learning_rate=schedule, momentum=0.9, kl_clip=None, fallback="momentum")
    x, y = np.zeros((4, 1), "float32"), np.ones((4, 1), "float32")
    with pytest.warns(UserWarning, match="no curvature block"):  # at compile: the model is built
        model.compile(optimizer=optimizer, loss="mse")
        model.train_on_batch(x, y)
    w1 = float(layer.w.numpy()[0])
    grad1 = -2.0  # d/dw mean((w - 1)^2) at w = 0
    assert w1 == pytest.approx(-0.1 * grad1, rel=1e-5)
    model.train_on_batch(x, y)
    grad2 = 2.0 * (w1 - 1.0)
    velocity1 = -0.1 * grad1
    mu = 0.9 * 0.01 / 0.1  # rescaled: the learning rate dropped 10x
    assert float(layer.w.numpy()[0]) == pytest.approx(w1 + mu * velocity1 - 0.01 * grad2, rel=1e-5)


def test_weight_rescaling_caps_kernel_norms():
    optimizer = keras_hoopt.SPNGD(learning_rate=0.5, kl_clip=None, weight_rescaling=True, damping=1e-2)
    model = _train(optimizer, epochs=1)
    for name in ["c", "d1", "d2"]:
        kernel = model.get_layer(name).kernel.numpy()
        assert np.linalg.norm(kernel) <= np.sqrt(2 * kernel.shape[-1]) * (1 + 1e-5)


def test_spngd_and_thor_config_round_trip_and_bad_inputs():
    spngd = keras_hoopt.SPNGD(learning_rate=0.02, similarity_threshold=0.2, max_interval=7, weight_rescaling=True)
    again = keras_hoopt.SPNGD.from_config(spngd.get_config())
    assert again.get_config() == spngd.get_config()
    damping = keras_hoopt.schedules.EpochExponentialDecay(0.03, steps_per_epoch=5)
    thor = keras_hoopt.THOR(damping=damping, frequency=7, omega1=0.02, omega2=0.001, split_dim=32)
    assert keras_hoopt.THOR.from_config(thor.get_config()).get_config() == thor.get_config()
    for cls, kwargs, name in [
        (keras_hoopt.SPNGD, {"similarity_threshold": -0.1}, "similarity_threshold"),
        (keras_hoopt.SPNGD, {"max_interval": 0}, "max_interval"),
        (keras_hoopt.SPNGD, {"momentum_rescaling": "yes"}, "momentum_rescaling"),
        (keras_hoopt.THOR, {"frequency": 0}, "frequency"),
        (keras_hoopt.THOR, {"omega1": 0.01, "omega2": 0.1}, "omega2"),
        (keras_hoopt.THOR, {"split_dim": 0}, "split_dim"),
    ]:
        with pytest.raises(ValueError, match=name):
            cls(**kwargs)


def test_spngd_and_thor_train_cnn_with_batchnorm_on_digits_as_well_as_kfac():
    (x, y), (x_test, y_test) = keras_hoopt.datasets.load_mnist_5k(image=True)

    def fit(optimizer):
        keras.backend.clear_session()
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((28, 28, 1)),
                keras.layers.Conv2D(8, 5, strides=2, padding="same", use_bias=False),
                keras.layers.BatchNormalization(momentum=0.9),  # 96 steps: short BN memory
                keras.layers.Activation("relu"),
                keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False),
                keras.layers.BatchNormalization(momentum=0.9),  # 96 steps: short BN memory
                keras.layers.Activation("relu"),
                keras.layers.Flatten(),
                keras.layers.Dense(10, activation="softmax"),
            ]
        )
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        model.fit(x, y, batch_size=128, epochs=3, verbose=0)
        return model.evaluate(x_test, y_test, verbose=0)[1], optimizer.curvature_summary()

    common = dict(learning_rate=0.3, damping=1e-2, kl_clip=1e-3, step_size="fixed", fisher="empirical")
    kfac_acc, _ = fit(keras_hoopt.KFAC(**common))
    spngd_acc, spngd_rows = fit(keras_hoopt.SPNGD(**common))
    thor_acc, thor_rows = fit(keras_hoopt.THOR(frequency=10, **common))
    assert kfac_acc > 0.92
    assert spngd_acc >= kfac_acc - 0.03 and thor_acc >= kfac_acc - 0.03, (kfac_acc, spngd_acc, thor_acc)
    steps = 3 * 32
    assert sum(r["refreshes"] for r in spngd_rows) < 0.7 * steps * len(spngd_rows)  # real skipping
    assert all(r["refreshes"] == 10 for r in thor_rows)


def test_the_adaptive_policy_decides_every_statistic_of_every_block_in_one_pass_as_each_alone():
    # The vectorised decision over 3 blocks (6 statistics) in different states against the scalar rule applied
    # to each statistic on its own: catches a statistic paired with another's schedule, counters or changes.
    blocks = [_dense_block(units=u, inputs=i) for u, i in ((2, 3), (3, 2), (4, 4))]
    names = ["A", "G"]
    policy = AdaptiveInterval(0.1, max_interval=20)
    policy.build(_Variables(), [BlockView(b, block, names, None) for b, block in enumerate(blocks)])
    rng = np.random.default_rng(0)
    step = tf.constant(30, tf.int64)
    views, expected_due, expected_schedule, refreshed, measured, old = [], {}, {}, {}, {}, {}
    for b, block in enumerate(blocks):
        counters, refreshed[b], measured[b], old[b] = {}, {}, {}, {}
        for name in names:
            interval, previous = int(rng.integers(1, 9)), int(rng.integers(1, 9))
            refreshes, last = int(rng.integers(0, 4)), int(rng.integers(18, 30))
            changes = rng.uniform(0.0, 0.2, size=2).astype("float32")
            was_refreshed = bool(rng.integers(0, 2))
            policy._schedules[(b, name)].assign([interval, previous])
            counters[name] = tf.constant([refreshes, last, 0, 0, 0], tf.int64)
            refreshed[b][name], measured[b][name] = tf.constant(was_refreshed), tf.constant(changes)
            old[b][name] = tf.eye(block.statistic_shapes()[name][0])
            expected_due[(b, name)] = refreshes == 0 or 30 - last >= interval
            new = [int(v) for v in next_interval(
                tf.constant(interval, tf.int64), tf.constant(previous, tf.int64),
                tf.constant(bool(changes[0] < 0.1)), tf.constant(bool(refreshes >= 2 and changes[1] < 0.1)), 20,
            )]
            expected_schedule[(b, name)] = new if was_refreshed and refreshes >= 1 else [interval, previous]
        views.append(BlockView(b, block, names, counters))
    for view, due in zip(views, policy.statistics_due_together(views, step)):
        assert {n: bool(d) for n, d in due.items()} == {n: expected_due[(view.index, n)] for n in names}
    dues, assignments = policy.after_refresh_together(views, old, old, refreshed, step, 1e-3, measured)
    written = {id(variable): value for variable, value, when in assignments if when is None}
    for view in views:
        for name in names:
            value = written[id(policy._schedules[(view.index, name)])]
            assert [int(v) for v in value] == expected_schedule[(view.index, name)], (view.index, name)
    assert len(set(tuple(v) for v in expected_schedule.values())) > 2  # the states really differ
