"""Step control of the exact optimizers: Levenberg-Marquardt damping, rejected and skipped steps.

The LM rule is checked against an independent numpy re-implementation of the documented rule
(docs/exact.md, "Step control") on linear least squares, where the loss, gradient, Hessian
and empirical Fisher have closed forms: ``L = mean((X~ W~ - Y)^2)``, ``grad = 2/(NK) X~^T R``,
``H = 2/(NK) kron(X~^T X~, I_K)`` (the Gauss-Newton Fisher too), empirical Fisher
``(1/N) sum_n g_n g_n^T`` with ``g_n = x~_n (x) 2 r_n / K``. ``theta`` is ``W~ = [kernel; bias]``
flattened row-major, the optimizers' layout.
"""

import numpy as np
import pytest
import keras

import keras_hoopt

# The documented rule: rho < 0.25 -> lambda * 1.5, rho > 0.75 -> lambda * 2/3, floor = damping.
LOWER, UPPER, GROW, SHRINK = 0.25, 0.75, 1.5, 2.0 / 3.0
EXACT = (keras_hoopt.NaturalGradient, keras_hoopt.Newton)

# ---------------------------------------------------------------------------------------
# numpy reference: linear least squares and the LM rule


class _LeastSquares:
    def __init__(self, n=64, d=3, k=2, seed=0):
        rng = np.random.default_rng(seed)
        self.x = rng.normal(size=(n, d)).astype("float32")
        self.y = (self.x @ rng.normal(size=(d, k)) + 0.5 + 0.05 * rng.normal(size=(n, k))).astype("float32")
        self.X = np.c_[self.x, np.ones(n)].astype(np.float64)
        self.N, self.K = self.y.shape
        self.optimum = np.linalg.lstsq(self.X, self.y.astype(np.float64), rcond=None)[0].ravel()

    def residual(self, theta):
        return self.X @ theta.reshape(self.X.shape[1], self.K) - self.y

    def loss(self, theta):
        return float(np.mean(self.residual(theta) ** 2))

    def grad(self, theta):
        return (2.0 / (self.N * self.K)) * (self.X.T @ self.residual(theta)).ravel()

    def hessian(self, theta):
        return (2.0 / (self.N * self.K)) * np.kron(self.X.T @ self.X, np.eye(self.K))

    def empirical_fisher(self, theta):
        g = np.stack([np.outer(xn, 2.0 * rn / self.K).ravel() for xn, rn in zip(self.X, self.residual(theta))])
        return g.T @ g / self.N

    def model(self, theta):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((self.x.shape[1],)), keras.layers.Dense(self.K, name="dense")])
        stacked = theta.reshape(self.X.shape[1], self.K)
        model.get_layer("dense").set_weights([stacked[:-1].astype("float32"), stacked[-1].astype("float32")])
        return model


def _lm_reference(problem, theta, curvature, floors, learning_rate=1.0, momentum=0.0, weight_decay=0.0):
    """The documented rule in float64, one full-batch step per floor. Returns one dict per step."""
    adapted, velocity, steps = 0.0, np.zeros_like(theta), []
    for floor in floors:
        lam = max(adapted, floor)
        g, c = problem.grad(theta), curvature(theta)
        p = np.linalg.solve(c + lam * np.eye(len(g)), g)
        velocity_new = momentum * velocity - learning_rate * p
        proposed = velocity_new - learning_rate * weight_decay * theta
        actual = problem.loss(theta) - problem.loss(theta + proposed)
        predicted = -(g @ proposed + 0.5 * proposed @ c @ proposed)
        rho = actual / predicted if predicted > 0 else 0.0
        adapted = lam * GROW if rho < LOWER else lam * SHRINK if rho > UPPER else lam
        accepted = actual > 0
        theta = theta + proposed if accepted else theta
        velocity = velocity_new if accepted else np.zeros_like(velocity)
        steps.append(dict(damping=lam, rho=rho, actual=actual, accepted=accepted, theta=theta, adapted=adapted))
    return steps


def _train_recording(model, optimizer, problem, steps, **compile_kwargs):
    """Full-batch steps; after each: (flat weights, current_damping(), rejected_steps)."""
    model.compile(optimizer=optimizer, loss="mse", **compile_kwargs)
    records = []
    for _ in range(steps):
        model.train_on_batch(problem.x, problem.y)
        flat = np.concatenate([np.ravel(v.numpy()) for v in model.trainable_variables]).astype(np.float64)
        records.append((flat, optimizer.current_damping(), optimizer.rejected_steps))
    return records


def _assert_matches(records, reference, floors_after):
    rejected = 0
    for (flat, damping, rejections), step, floor in zip(records, reference, floors_after):
        rejected += not step["accepted"]
        np.testing.assert_allclose(flat, step["theta"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(damping, max(step["adapted"], floor), rtol=1e-5)
        assert rejections == rejected


# ---------------------------------------------------------------------------------------
# the LM rule against numpy


@pytest.mark.parametrize(
    "make, mode, weight_decay",
    [
        (keras_hoopt.Newton, dict(jit_compile=False), None),
        (keras_hoopt.Newton, dict(run_eagerly=True), None),
        (keras_hoopt.Newton, dict(jit_compile=False), 0.1),
        (lambda **kw: keras_hoopt.NaturalGradient(fisher="exact", **kw), dict(jit_compile=False), None),
        (lambda **kw: keras_hoopt.NaturalGradient(fisher="exact", **kw), dict(jit_compile=True), None),
    ],
    ids=["newton-graph", "newton-eager", "newton-graph-weight-decay", "ngd-graph", "ngd-xla"],
)
def test_exact_quadratic_model_gives_rho_one_and_damping_shrinks_by_two_thirds(make, mode, weight_decay):
    # Linear least squares: the Hessian (= Gauss-Newton Fisher) quadratic model is exact, so
    # rho == 1 at every step, whatever the step (also with Keras's decoupled weight decay in
    # it). A fast-decaying damping schedule puts the floor far below, so lambda follows
    # 1, 2/3, 4/9, ... exactly.
    problem = _LeastSquares()
    theta = problem.optimum + np.random.default_rng(1).normal(size=problem.optimum.shape)
    schedule = keras.optimizers.schedules.ExponentialDecay(1.0, decay_steps=1, decay_rate=1e-3)
    floors = [1e-3**k for k in range(5)]
    reference = _lm_reference(problem, theta, problem.hessian, floors[:4], weight_decay=weight_decay or 0.0)
    assert all(abs(step["rho"] - 1.0) < 1e-9 and step["accepted"] for step in reference)
    optimizer = make(damping=schedule, weight_decay=weight_decay)
    records = _train_recording(problem.model(theta), optimizer, problem, 4, **mode)
    _assert_matches(records, reference, floors[1:])
    assert [round(d, 6) for _, d, _ in records] == [round(SHRINK**k, 6) for k in range(1, 5)]


def test_an_overconfident_matrix_is_rejected_until_the_damping_has_grown():
    # The empirical Fisher of a nearly fitted least-squares problem is far smaller than the
    # Hessian: the step overshoots (rho < 0), is rejected and lambda grows by 1.5 until the
    # steps are accepted (the last ones with 0 < rho < 0.25: accepted, lambda still grows,
    # and 0.25 < rho < 0.75: lambda kept).
    problem = _LeastSquares()
    theta = problem.optimum + 0.2 * np.random.default_rng(0).normal(size=problem.optimum.shape)
    floors = [0.1] * 7
    reference = _lm_reference(problem, theta, problem.empirical_fisher, floors)
    rhos = [step["rho"] for step in reference]
    assert [step["accepted"] for step in reference] == [False] * 4 + [True] * 3, rhos
    assert rhos[4] < LOWER < rhos[5] < UPPER, rhos
    # No decision near a tie that float32 could break the other way.
    assert min(abs(r - b) for r in rhos for b in (0.0, LOWER, UPPER)) > 0.02, rhos
    assert min(abs(step["actual"]) for step in reference) > 1e-3
    optimizer = keras_hoopt.NaturalGradient(fisher="empirical", damping=0.1)
    records = _train_recording(problem.model(theta), optimizer, problem, 7, jit_compile=False)
    _assert_matches(records, reference, floors)
    np.testing.assert_array_equal(records[3][0], theta.astype(np.float32))  # untouched while rejected
    assert optimizer.skipped_steps == 0 and optimizer.rejected_steps == 4


@pytest.mark.parametrize("mode", [dict(jit_compile=False), dict(run_eagerly=True)], ids=["graph", "eager"])
def test_momentum_candidate_is_the_applied_update_and_a_rejection_restarts_the_velocity(mode):
    # Heavy ball on the exact quadratic: the velocity overshoots at step 3 (the model predicts
    # an increase: rho = 0), which is rejected (weights unchanged, velocity reset to 0,
    # lambda * 1.5); step 4 is a plain damped step.
    problem = _LeastSquares()
    theta = problem.optimum + np.random.default_rng(2).normal(size=problem.optimum.shape)
    floors = [1e-3] * 4
    reference = _lm_reference(problem, theta, problem.hessian, floors, learning_rate=0.3, momentum=0.9)
    assert [step["accepted"] for step in reference] == [True, True, False, True]
    assert min(abs(step["actual"]) for step in reference) > 1e-2  # decisions well above float32 noise
    optimizer = keras_hoopt.Newton(learning_rate=0.3, momentum=0.9, damping=1e-3)
    model = problem.model(theta)
    records = _train_recording(model, optimizer, problem, 3, **mode)
    momenta = [v.numpy() for v in optimizer.variables if "momentum" in v.path]
    assert len(momenta) == 2 and not any(np.any(m) for m in momenta)  # kernel and bias: restarted
    model.train_on_batch(problem.x, problem.y)
    flat = np.concatenate([np.ravel(v.numpy()) for v in model.trainable_variables]).astype(np.float64)
    records.append((flat, optimizer.current_damping(), optimizer.rejected_steps))
    _assert_matches(records, reference, floors)


def test_a_failed_newton_solve_continues_from_the_last_damping_tried():
    # loss(w1, w2) = (w1 w2 - 1)^2 at (0.1, 0.1): H + lambda I is indefinite up to 1000 lambda, so
    # the raw gradient is used; the LM rule then starts from 1000 lambda.
    model = keras.Sequential(
        [keras.Input((1,)), keras.layers.Dense(1, use_bias=False), keras.layers.Dense(1, use_bias=False)]
    )
    for v in model.trainable_variables:
        v.assign([[0.1]])
    w = np.array([0.1, 0.1])
    loss = lambda w: (w[0] * w[1] - 1) ** 2
    grad = 2 * (w[0] * w[1] - 1) * w[::-1]
    hessian = np.array([[2 * w[1] ** 2, 2 * (2 * w[0] * w[1] - 1)], [2 * (2 * w[0] * w[1] - 1), 2 * w[0] ** 2]])
    step = -0.1 * grad
    rho = (loss(w) - loss(w + step)) / -(grad @ step + 0.5 * step @ hessian @ step)
    assert rho > UPPER
    newton = keras_hoopt.Newton(damping=1e-3, learning_rate=0.1)
    model.compile(optimizer=newton, loss="mse")
    model.train_on_batch(np.ones((8, 1), "float32"), np.ones((8, 1), "float32"))
    assert newton.failed_solves == 1 and newton.rejected_steps == 0
    np.testing.assert_allclose(newton.current_damping(), 1e-3 * 1000 * SHRINK, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# the defaults on small MLPs


def _problem(kind):
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    if kind == "relu-softmax-4-8-3":  # the reproduction: random inputs and labels
        x, y = rng.normal(size=(128, 4)).astype("float32"), rng.integers(0, 3, 128)
        layers = [keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)]
        return x, y, layers, keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if kind == "relu-mse-3-10-1":
        x = rng.normal(size=(128, 3)).astype("float32")
        y = (np.sin(2 * x[:, :1]) + x[:, 1:2] * x[:, 2:3]).astype("float32")
        layers = [keras.Input((3,)), keras.layers.Dense(10, activation="relu"), keras.layers.Dense(1)]
        return x, y, layers, "mse"
    x = rng.normal(size=(128, 5)).astype("float32")  # tanh-bce-5-6-1: XOR of two signs
    y = (x[:, :1] * x[:, 1:2] > 0).astype("float32")
    layers = [keras.Input((5,)), keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(1)]
    return x, y, layers, keras.losses.BinaryCrossentropy(from_logits=True)


def _fit_small_mlp(kind, optimizer):
    x, y, layers, loss = _problem(kind)
    model = keras.Sequential(layers)
    model.compile(optimizer=optimizer, loss=loss, jit_compile=False)
    start = model.evaluate(x, y, batch_size=128, verbose=0)
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0, shuffle=False).history["loss"]
    return start, history, model.evaluate(x, y, batch_size=128, verbose=0), model


@pytest.mark.parametrize("kind", ["relu-softmax-4-8-3", "relu-mse-3-10-1", "tanh-bce-5-6-1"])
@pytest.mark.parametrize("cls", EXACT, ids=lambda c: c.__name__)
def test_defaults_train_small_mlps_without_diverging(cls, kind):
    optimizer = cls()
    start, history, end, model = _fit_small_mlp(kind, optimizer)
    print(cls.__name__, kind, start, history, end, optimizer.current_damping(), optimizer.rejected_steps)
    assert np.isfinite(history).all() and max(history) < 2 * start, history
    assert end < start, (start, end)
    assert all(np.isfinite(v.numpy()).all() for v in model.weights)
    assert optimizer.skipped_steps == 0


def test_step_control_is_what_stops_the_old_default_from_diverging():
    # damping=1e-3 was the old default: without step control the natural gradient blows up on
    # the reproduction (loss ~1e14); with it every bad step is rejected.
    unguarded_optimizer = keras_hoopt.NaturalGradient(damping=1e-3, step_control=None)
    _, unguarded, _, _ = _fit_small_mlp("relu-softmax-4-8-3", unguarded_optimizer)
    assert not (np.isfinite(unguarded).all() and max(unguarded) < 1e3), unguarded
    optimizer = keras_hoopt.NaturalGradient(damping=1e-3)
    start, history, end, _ = _fit_small_mlp("relu-softmax-4-8-3", optimizer)
    assert np.isfinite(history).all() and max(history) < 1.5 * start and end < 1.5 * start, (start, history, end)
    assert optimizer.rejected_steps > 0 and optimizer.current_damping() > 10 * 1e-3


# ---------------------------------------------------------------------------------------
# non-finite steps


@pytest.mark.parametrize(
    "cls, mode, step_control, batchnorm",
    [
        (keras_hoopt.NaturalGradient, dict(jit_compile=False), "lm", False),
        (keras_hoopt.NaturalGradient, dict(jit_compile=True), "lm", False),
        (keras_hoopt.NaturalGradient, dict(run_eagerly=True), "lm", False),
        (keras_hoopt.Newton, dict(jit_compile=False), "lm", True),
        (keras_hoopt.NaturalGradient, dict(jit_compile=False), None, True),
    ],
    ids=["ngd-graph", "ngd-xla", "ngd-eager", "newton-graph-batchnorm", "ngd-graph-batchnorm-no-step-control"],
)
def test_a_nan_batch_applies_nothing_and_is_counted(cls, mode, step_control, batchnorm):
    # "Nothing": no weight (also no weight decay and no BatchNorm moving statistic, which the
    # training forward pass wrote), no momentum, no damping, no counter but skipped_steps.
    x, y, layers, loss = _problem("relu-softmax-4-8-3")
    if batchnorm:
        layers.insert(2, keras.layers.BatchNormalization())
    model = keras.Sequential(layers)
    optimizer = cls(momentum=0.5, weight_decay=1e-2, step_control=step_control)
    model.compile(optimizer=optimizer, loss=loss, **mode)
    for start in (0, 16):
        model.train_on_batch(x[start : start + 16], y[start : start + 16])
    tracked = model.weights + optimizer.variables  # built by the first step
    state = [np.array(v.numpy(), copy=True) for v in tracked]
    bad = x[32:48].copy()
    bad[[2, 9]] = np.nan  # two rows of one batch
    model.train_on_batch(bad, y[32:48])
    changed = {v.path for v, before in zip(tracked, state) if not np.array_equal(before, v.numpy())}
    assert changed == {f"{optimizer.name}/iteration", f"{optimizer.name}/skipped_steps"}
    assert optimizer.skipped_steps == 1 and optimizer.rejected_steps == 0
    for start in (48, 64):  # trains on
        model.train_on_batch(x[start : start + 16], y[start : start + 16])
    assert all(np.isfinite(v.numpy()).all() for v in model.weights)
    assert optimizer.skipped_steps == 1 and int(optimizer.iterations.numpy()) == 5
    assert all(not np.array_equal(before, v.numpy()) for v, before in zip(model.weights, state))  # all moved


# ---------------------------------------------------------------------------------------
# arguments, config, saving


@pytest.mark.parametrize("cls", EXACT, ids=lambda c: c.__name__)
def test_bad_step_control_and_on_nonfinite_name_the_argument_and_the_choices(cls):
    for value in ("LM", "trust_region", True, 0):
        with pytest.raises(ValueError, match=r"`step_control`.*Accepted: 'lm' or None"):
            cls(step_control=value)
    for value in ("warn", None, "SKIP"):
        with pytest.raises(ValueError, match=r"`on_nonfinite`.*Accepted: 'skip' or 'raise'"):
            cls(on_nonfinite=value)
    optimizer = cls(step_control=None, on_nonfinite="raise")
    assert (optimizer.step_control, optimizer.on_nonfinite) == (None, "raise")
    assert (optimizer.skipped_steps, optimizer.rejected_steps, optimizer.current_damping()) == (0, 0, 1.0)


@pytest.mark.parametrize("cls", EXACT, ids=lambda c: c.__name__)
def test_get_config_round_trip_keeps_the_step_control_arguments(cls):
    for kwargs in (dict(), dict(step_control=None, on_nonfinite="raise")):
        optimizer = cls(**kwargs)
        config = optimizer.get_config()
        assert config["step_control"] == kwargs.get("step_control", "lm")
        assert config["on_nonfinite"] == kwargs.get("on_nonfinite", "skip")
        assert cls.from_config(config).get_config() == config
        restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
        assert type(restored) is cls and restored.get_config() == config


def test_keras_save_load_keeps_the_adapted_damping_and_the_counters(tmp_path):
    x, y, layers, loss = _problem("relu-softmax-4-8-3")
    model = keras.Sequential(layers)
    optimizer = keras_hoopt.NaturalGradient(damping=1e-3, momentum=0.5)
    model.compile(optimizer=optimizer, loss=loss, jit_compile=False)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    adapted = optimizer.current_damping()
    assert adapted > 1e-2 and optimizer.rejected_steps > 0  # adapted away from the floor

    path = str(tmp_path / "ngd.keras")
    model.save(path)
    loaded = keras_hoopt.load_model(path)
    restored = loaded.optimizer
    assert isinstance(restored, keras_hoopt.NaturalGradient) and restored.step_control == "lm"
    assert restored.current_damping() == adapted
    assert (restored.rejected_steps, restored.skipped_steps) == (optimizer.rejected_steps, 0)
    for a, b in zip(restored.variables, optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    loaded.fit(x[:64], y[:64], batch_size=16, epochs=1, verbose=0, shuffle=False)
    model.fit(x[:64], y[:64], batch_size=16, epochs=1, verbose=0, shuffle=False)
    np.testing.assert_allclose(restored.current_damping(), optimizer.current_damping(), rtol=1e-6)
    for a, b in zip(loaded.trainable_variables, model.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
