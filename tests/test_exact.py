"""Exact natural gradient and Newton: optimum in one step, K-FAC's exact limit, Fisher structure.

References are independent of the optimizers' code: least-squares optima from
``np.linalg.lstsq``, per-example gradients from one ``tf.GradientTape`` per example,
Kronecker products with ``np.kron``, saddle-free steps from ``np.linalg.eigh``.
Flat parameter layout: the model's trainable variables in order, each flattened
row-major (Keras Dense kernel ``(d_in, d_out)``, then its bias), so the block of a
Dense layer is ``kron(A, G)`` with K-FAC's ``A`` (bias as trailing 1) and ``G``.
"""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_hoopt
from keras_hoopt.optimizers._exact import BatchRecorder

# ---------------------------------------------------------------------------------------
# helpers


def _least_squares_data(n, d_in=5, d_out=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d_in)).astype("float32")
    w = rng.normal(size=(d_in, d_out))
    y = (x @ w + 0.5 + 0.1 * rng.normal(size=(n, d_out))).astype("float32")
    optimum = np.linalg.lstsq(np.c_[x, np.ones(n)], y, rcond=None)[0]  # [kernel; bias]
    return x, y, optimum


def _dense_model(d_in=5, d_out=3, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((d_in,)), keras.layers.Dense(d_out, name="dense")])


def _stacked(model):
    kernel, bias = model.get_layer("dense").get_weights()
    return np.r_[kernel, bias[None]].astype(np.float64)


def _one_step(model, optimizer, x, y, loss="mse", **compile_kwargs):
    """One full-batch step; returns the weight change (flat, float64)."""
    model.compile(optimizer=optimizer, loss=loss, **compile_kwargs)
    before = _flat(model)
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False)
    return _flat(model) - before


def _flat(model):
    return np.concatenate([np.ravel(v.numpy()) for v in model.trainable_variables]).astype(np.float64)


def _kfac_exact_limit(fisher):
    return keras_hoopt.KFAC(
        learning_rate=1.0, momentum=0.0, factor_decay=0.0, kl_clip=None, damping=1e-10,
        inverse_update_interval=1, fisher=fisher, seed=3, step_size="fixed",
    )


def _relative(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _per_example_gradients(model, loss_fn, x, y):
    """``[N, P]`` gradients of each example's loss, one tape per example (float64)."""
    rows = []
    for n in range(len(x)):
        with tf.GradientTape() as tape:
            loss = loss_fn(y[n : n + 1], model(x[n : n + 1], training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        rows.append(np.concatenate([np.ravel(g.numpy()) for g in grads]))
    return np.asarray(rows, dtype=np.float64)


# ---------------------------------------------------------------------------------------
# linear least squares: one step to the optimum


@pytest.mark.parametrize(
    "make, mode",
    [
        (lambda: keras_hoopt.Newton(damping=1e-8), dict(jit_compile=False)),
        (lambda: keras_hoopt.Newton(damping=1e-8), dict(run_eagerly=True)),
        (lambda: keras_hoopt.NaturalGradient(fisher="exact", damping=1e-8), dict(jit_compile=False)),
        (lambda: keras_hoopt.NaturalGradient(fisher="exact", damping=1e-8), dict(run_eagerly=True)),
        (lambda: keras_hoopt.NaturalGradient(fisher="exact", damping=1e-8), dict(jit_compile=True)),
    ],
    ids=["newton-graph", "newton-eager", "ngd-graph", "ngd-eager", "ngd-xla"],
)
def test_one_step_lands_on_least_squares_optimum(make, mode):
    x, y, optimum = _least_squares_data(256)
    model = _dense_model()
    start = np.abs(_stacked(model) - optimum).max()
    _one_step(model, make(), x, y, **mode)
    assert start > 0.5
    np.testing.assert_allclose(_stacked(model), optimum, atol=2e-4)


def test_sample_weights_weight_each_example_once():
    x, y, _ = _least_squares_data(256)
    weights = np.random.default_rng(3).uniform(0.2, 2.0, size=256).astype("float32")
    root = np.sqrt(weights)[:, None]
    optimum = np.linalg.lstsq(np.c_[x, np.ones(len(x))] * root, y * root, rcond=None)[0]
    for optimizer in (keras_hoopt.Newton(damping=1e-8), keras_hoopt.NaturalGradient(fisher="exact", damping=1e-8)):
        model = _dense_model()
        model.compile(optimizer=optimizer, loss="mse", jit_compile=False)
        model.fit(x, y, sample_weight=weights, batch_size=256, epochs=1, verbose=0)
        np.testing.assert_allclose(_stacked(model), optimum, atol=2e-4)


def test_newton_minimises_the_whole_training_loss_with_kernel_and_activity_regularizers():
    x, y, _ = _least_squares_data(256)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(
                3, kernel_regularizer=keras.regularizers.L2(0.1), activity_regularizer=keras.regularizers.L2(0.05)
            ),
        ]
    )
    model.compile(optimizer=keras_hoopt.Newton(damping=1e-8), loss="mse", jit_compile=False)

    def training_gradient():
        with tf.GradientTape() as tape:
            loss = model.compute_loss(x, y, model(x, training=True))
        assert len(model.losses) == 2
        return np.concatenate([np.ravel(g) for g in tape.gradient(loss, model.trainable_variables)])

    assert np.abs(training_gradient()).max() > 0.1
    model.fit(x, y, batch_size=256, epochs=1, verbose=0)
    assert np.abs(training_gradient()).max() < 5e-6  # a quadratic loss: one Newton step


def test_monte_carlo_natural_gradient_lands_within_sampling_error():
    x, y, optimum = _least_squares_data(8192)
    errors = {}
    for fisher in ("mc", "empirical"):
        model = _dense_model()
        start = np.linalg.norm(_stacked(model) - optimum)
        _one_step(model, keras_hoopt.NaturalGradient(fisher=fisher, damping=1e-8, seed=0), x, y)
        errors[fisher] = np.linalg.norm(_stacked(model) - optimum) / start
    # One sampled label per example: relative Fisher error ~ 1/sqrt(N) times a small constant.
    assert 0.0 < errors["mc"] < 0.12, errors
    # The empirical Fisher (training residuals) is not the Hessian: no one-step solve.
    assert errors["empirical"] > 0.3, errors


# ---------------------------------------------------------------------------------------
# a single Dense layer with MSE: the true Fisher is exactly Kronecker, K-FAC is exact


def test_single_dense_mse_expected_fisher_is_kfacs_kronecker_product():
    x, y, _ = _least_squares_data(512, d_in=4, d_out=3)
    model = _dense_model(4, 3)
    ngd = keras_hoopt.NaturalGradient(fisher="exact")
    model.compile(optimizer=ngd, loss="mse")
    fisher = ngd.curvature_matrix(x, y)
    kfac = _kfac_exact_limit("mc")
    _one_step(model, kfac, x, y, jit_compile=False)
    a = kfac.statistic("dense", "A")
    np.testing.assert_allclose(a, np.c_[x, np.ones(len(x))].T @ np.c_[x, np.ones(len(x))] / len(x), rtol=1e-5, atol=1e-6)
    # E[G] = (2/K) I for Keras's MSE (mean over K outputs): F = A (x) (2/K) I exactly.
    np.testing.assert_allclose(fisher, np.kron(a, np.eye(3) * 2.0 / 3.0), rtol=1e-5, atol=1e-6)
    # K-FAC's Monte-Carlo G estimates that expectation.
    assert _relative(kfac.statistic("dense", "G"), np.eye(3) * 2.0 / 3.0) < 0.2


def test_single_dense_mse_kfac_step_equals_natural_gradient_step():
    x, y, _ = _least_squares_data(4096, d_in=4, d_out=3, seed=1)
    steps = {}
    for name, optimizer in [
        ("ngd-exact", keras_hoopt.NaturalGradient(fisher="exact", damping=1e-10)),
        ("ngd-mc", keras_hoopt.NaturalGradient(fisher="mc", damping=1e-10, seed=5)),
        ("kfac-mc", _kfac_exact_limit("mc")),
    ]:
        steps[name] = _one_step(_dense_model(4, 3), optimizer, x, y, jit_compile=False)
    assert 0.0 < _relative(steps["kfac-mc"], steps["ngd-exact"]) < 0.1
    assert 0.0 < _relative(steps["ngd-mc"], steps["ngd-exact"]) < 0.1


def test_single_dense_empirical_fisher_with_equal_residuals_is_kronecker_and_steps_match():
    # With one output and residuals of equal magnitude, g_n^2 is the same for every example,
    # so the empirical Fisher is exactly A (x) G and K-FAC's step is the natural-gradient step.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(256, 4)).astype("float32")
    model = _dense_model(4, 1)
    initial = model.get_weights()
    y = (model.predict(x, verbose=0) + 0.7 * rng.choice([-1.0, 1.0], size=(256, 1))).astype("float32")
    ngd_step = _one_step(model, keras_hoopt.NaturalGradient(fisher="empirical", damping=1e-10), x, y)
    model = _dense_model(4, 1)
    model.set_weights(initial)
    kfac_step = _one_step(model, _kfac_exact_limit("empirical"), x, y, jit_compile=False)
    np.testing.assert_allclose(kfac_step, ngd_step, rtol=2e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------
# a small MLP: exact Fisher vs its block diagonal vs K-FAC's Kronecker blocks


def _mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(5, activation="tanh", name="hidden"), keras.layers.Dense(4, name="out")]
    )


def test_small_mlp_exact_fisher_block_diagonal_and_kronecker_errors():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 6)).astype("float32")
    y = rng.integers(0, 4, size=96).astype("int32")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = _mlp()
    grads = _per_example_gradients(model, loss, x, y)
    fisher = grads.T @ grads / len(x)  # empirical Fisher, numpy

    ngd = keras_hoopt.NaturalGradient(fisher="empirical")
    model.compile(optimizer=ngd, loss=loss)
    np.testing.assert_allclose(ngd.curvature_matrix(x, y), fisher, rtol=1e-4, atol=1e-6)
    layout = ngd.parameter_layout()
    assert [(p.split("/")[-2], s) for p, s, _ in layout] == [
        ("hidden", (6, 5)), ("hidden", (5,)), ("out", (5, 4)), ("out", (4,))
    ]

    kfac = _kfac_exact_limit("empirical")
    _one_step(model, kfac, x, y, loss=loss, jit_compile=False)  # statistics at the same weights
    block_diagonal = np.zeros_like(fisher)
    kronecker = np.zeros_like(fisher)
    errors = {}
    for name, start, stop in [("hidden", 0, 35), ("out", 35, 59)]:
        block = fisher[start:stop, start:stop]
        approx = np.kron(kfac.statistic(name, "A"), kfac.statistic(name, "G"))
        block_diagonal[start:stop, start:stop] = block
        kronecker[start:stop, start:stop] = approx
        errors[name] = _relative(approx, block)
    errors["block_diagonal"] = _relative(block_diagonal, fisher)
    errors["kfac"] = _relative(kronecker, fisher)
    print("relative Frobenius errors vs the exact Fisher:", errors)
    for name in ("hidden", "out"):
        assert 0.01 < errors[name] < 0.75, errors  # moderate, never exact for an MLP
    assert 0.05 < errors["block_diagonal"] < 0.9, errors  # the off-diagonal blocks matter
    # K-FAC errs on the diagonal blocks too, so it cannot beat the block diagonal.
    assert errors["kfac"] >= errors["block_diagonal"], errors


def test_expected_fisher_of_softmax_regression_is_its_hessian():
    (x, y), _ = keras_hoopt.datasets.load_digits()
    x, y = x[:128, :16], y[:128] % 4
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(4, activation="softmax")])
    ngd = keras_hoopt.NaturalGradient(fisher="exact")
    model.compile(optimizer=ngd, loss="sparse_categorical_crossentropy")
    fisher = ngd.curvature_matrix(x, y)
    newton = keras_hoopt.Newton()
    model.compile(optimizer=newton, loss="sparse_categorical_crossentropy")
    hessian = newton.curvature_matrix(x, y)
    np.testing.assert_allclose(fisher, hessian, rtol=1e-4, atol=1e-6)
    assert np.linalg.eigvalsh(hessian).min() > -1e-6


def test_any_layer_type_fisher_is_the_gauss_newton_matrix_and_recomputation_has_no_side_effects():
    (x, y), _ = keras_hoopt.datasets.load_digits(image=True)
    x, y = x[:32], y[:32]

    def build():
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [
                keras.Input((8, 8, 1)),
                keras.layers.Conv2D(3, 3, strides=2),
                keras.layers.BatchNormalization(),
                keras.layers.Activation("relu"),
                keras.layers.Flatten(),
                keras.layers.LayerNormalization(),
                keras.layers.Dense(10, activation="softmax"),
            ]
        )

    model = build()
    ngd = keras_hoopt.NaturalGradient(fisher="exact", damping=1e-1, learning_rate=0.1)
    model.compile(optimizer=ngd, loss="sparse_categorical_crossentropy", jit_compile=False)
    fisher = ngd.curvature_matrix(x, y)
    # Reference: reverse-mode Jacobian of the whole batch's output (BatchNorm couples examples),
    # times the softmax-probability output Hessian diag(1/p) - 1 1^T.
    with tf.GradientTape(persistent=True) as tape:
        probs = model(x, training=True)
    jac = np.concatenate(
        [tape.jacobian(probs, v).numpy().reshape(32, 10, -1) for v in model.trainable_variables], -1
    ).astype(np.float64)
    p = probs.numpy().astype(np.float64)
    out_hessian = np.stack([np.diag(1.0 / q) - np.ones((10, 10)) for q in p])
    reference = np.einsum("nkp,nkl,nlq->pq", jac, out_hessian, jac) / 32
    np.testing.assert_allclose(fisher, reference, rtol=2e-4, atol=2e-5 * np.abs(reference).max())

    # One step updates BatchNorm's moving statistics once, exactly as SGD's step does.
    model = build()
    model.compile(optimizer=keras_hoopt.NaturalGradient(damping=1e-1, learning_rate=0.1), loss="sparse_categorical_crossentropy", jit_compile=False)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    sgd = build()
    sgd.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy", jit_compile=False)
    sgd.fit(x, y, batch_size=32, epochs=1, verbose=0)
    bn, bn_sgd = model.layers[1], sgd.layers[1]
    np.testing.assert_allclose(bn.moving_mean.numpy(), bn_sgd.moving_mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), bn_sgd.moving_variance.numpy(), rtol=1e-6)
    assert not np.allclose(bn.moving_mean.numpy(), 0.0)


# ---------------------------------------------------------------------------------------
# Newton: saddle-free, failed solves


def _saddle_model():
    """loss(w1, w2) = (w1 w2 - 1)^2 at (0.1, 0.1): H = [[.02, -1.96], [-1.96, .02]], indefinite."""
    model = keras.Sequential(
        [keras.Input((1,)), keras.layers.Dense(1, use_bias=False), keras.layers.Dense(1, use_bias=False)]
    )
    for v in model.trainable_variables:
        v.assign([[0.1]])
    return model


def test_saddle_free_newton_moves_downhill_where_newton_would_climb_to_the_saddle():
    x = np.ones((8, 1), "float32")
    y = np.ones((8, 1), "float32")
    w = np.array([0.1, 0.1])
    grad = 2 * (w[0] * w[1] - 1) * w[::-1]
    hessian = np.array([[2 * w[1] ** 2, 2 * (2 * w[0] * w[1] - 1)], [2 * (2 * w[0] * w[1] - 1), 2 * w[0] ** 2]])
    values, vectors = np.linalg.eigh(hessian)
    assert values.min() < 0

    model = _saddle_model()
    newton = keras_hoopt.Newton(damping=1e-6, saddle_free=True)
    model.compile(optimizer=newton, loss="mse")
    np.testing.assert_allclose(newton.curvature_matrix(x, y), hessian, rtol=1e-5, atol=1e-6)
    before = model.evaluate(x, y, verbose=0)
    step = _one_step(model, newton, x, y)
    expected = -(vectors @ ((vectors.T @ grad) / np.abs(values)))
    np.testing.assert_allclose(step, expected, rtol=1e-4)
    assert model.evaluate(x, y, verbose=0) < before - 0.05
    # The plain Newton step on the same point heads for the saddle at 0 (loss goes up).
    assert np.sum((w - np.linalg.solve(hessian, grad)) ** 2) < np.sum(w**2)

    # Plain damped Newton cannot factor H + lambda I (up to 1000 lambda): falls back to the gradient.
    model = _saddle_model()
    newton = keras_hoopt.Newton(damping=1e-3, learning_rate=0.1)
    step = _one_step(model, newton, x, y)
    assert newton.failed_solves == 1
    np.testing.assert_allclose(step, -0.1 * grad, rtol=1e-4)


# ---------------------------------------------------------------------------------------
# limits, bad inputs, config, attachment


def test_parameter_limit_names_the_limit_the_count_and_kfac():
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])  # 650 parameters
    for make in (keras_hoopt.NaturalGradient, keras_hoopt.Newton):
        with pytest.raises(ValueError, match=r"max_parameters=600.*650.*keras_hoopt\.KFAC"):
            model.compile(optimizer=make(max_parameters=600), loss="mse")
    # A model built only at fit time is refused when the optimizer is built.
    lazy = keras.Sequential([keras.layers.Dense(10)])
    lazy.compile(optimizer=keras_hoopt.Newton(max_parameters=600), loss="mse")
    with pytest.raises(ValueError, match=r"max_parameters=600.*650.*KFAC"):
        lazy.fit(np.zeros((4, 64), "float32"), np.zeros((4, 10), "float32"), verbose=0)


def test_invalid_hyperparameters_name_the_parameter():
    cases = [
        (lambda: keras_hoopt.NaturalGradient(damping=0.0), "damping"),
        (lambda: keras_hoopt.NaturalGradient(momentum=1.0), "momentum"),
        (lambda: keras_hoopt.NaturalGradient(fisher="true"), "fisher"),
        (lambda: keras_hoopt.NaturalGradient(seed=1.5), "seed"),
        (lambda: keras_hoopt.NaturalGradient(max_parameters=0), "max_parameters"),
        (lambda: keras_hoopt.NaturalGradient(jacobian_chunk_size=0), "jacobian_chunk_size"),
        (lambda: keras_hoopt.Newton(saddle_free="yes"), "saddle_free"),
        (lambda: keras_hoopt.Newton(nesterov=1), "nesterov"),
        (lambda: keras_hoopt.Newton(damping=-1.0), "damping"),
    ]
    for make, name in cases:
        with pytest.raises(ValueError, match=rf"`{name}`.*Accepted"):
            make()
    with pytest.raises(ValueError, match="'exact' or 'mc' or 'empirical'"):
        keras_hoopt.NaturalGradient(fisher="true")


def test_unusable_losses_and_missing_batch_are_explained():
    model = _dense_model()
    with pytest.raises(ValueError, match="fisher='exact' does not support.*fisher='empirical'"):
        model.compile(optimizer=keras_hoopt.NaturalGradient(), loss="mae")
    with pytest.raises(ValueError, match="fisher='mc' does not support"):
        model.compile(optimizer=keras_hoopt.NaturalGradient(fisher="mc"), loss="mae")
    model.compile(optimizer=keras_hoopt.NaturalGradient(fisher="empirical"), loss="mae")  # any loss

    orphan = keras_hoopt.Newton()
    variable = keras.Variable(np.zeros(3, "float32"))
    with pytest.raises(ValueError, match="needs its model"):
        orphan.apply_gradients([(tf.ones(3), variable)])
    model.compile(optimizer=keras_hoopt.Newton(), loss="mse")
    with pytest.raises(RuntimeError, match="no training batch"):
        model.optimizer.apply_gradients(zip([tf.zeros_like(v) for v in model.trainable_variables], model.trainable_variables))


def test_get_config_round_trip():
    schedule = keras.optimizers.schedules.ExponentialDecay(1e-2, 10, 0.5)
    for optimizer in (
        keras_hoopt.NaturalGradient(learning_rate=0.5, damping=schedule, momentum=0.5, nesterov=True, fisher="mc", seed=7, max_parameters=123, jacobian_chunk_size=16, clipnorm=1.0),
        keras_hoopt.Newton(learning_rate=0.3, damping=1e-2, saddle_free=True, max_parameters=77),
    ):
        config = optimizer.get_config()
        clone = type(optimizer).from_config(config)
        assert clone.get_config() == config
        restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
        assert type(restored) is type(optimizer) and restored.get_config() == config
    assert config["saddle_free"] is True and config["max_parameters"] == 77


def test_attachment_follows_compile_and_save_load(tmp_path):
    x, y, _ = _least_squares_data(64)
    model = _dense_model()
    model.compile(optimizer=keras_hoopt.Newton(momentum=0.5), loss="mse")
    assert isinstance(model.__dict__.get("_keras_hoopt_session"), BatchRecorder)
    assert "compute_loss" in model.__dict__
    model.compile(optimizer=keras.optimizers.SGD(), loss="mse")  # detaches
    assert "compute_loss" not in model.__dict__ and "_keras_hoopt_session" not in model.__dict__
    model.compile(optimizer=keras_hoopt.KFAC(), loss="mse")
    assert "call" in model.get_layer("dense").__dict__
    model.compile(optimizer=keras_hoopt.Newton(momentum=0.5), loss="mse")  # replaces K-FAC's capture
    assert "call" not in model.get_layer("dense").__dict__
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)

    path = str(tmp_path / "newton.keras")
    model.save(path)
    loaded = keras_hoopt.load_model(path)
    assert isinstance(loaded.optimizer, keras_hoopt.Newton)
    assert int(loaded.optimizer.iterations.numpy()) == 2
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_allclose(a.numpy(), b.numpy())
    loaded.fit(x, y, batch_size=32, epochs=1, verbose=0)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    np.testing.assert_allclose(_flat(loaded), _flat(model), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# training with fit


def test_fit_on_digits_beats_sgd_per_step():
    (x, y), _ = keras_hoopt.datasets.load_digits()
    x, y = x[:512], y[:512]
    losses = {}
    for name, optimizer in [
        ("sgd", keras.optimizers.SGD(learning_rate=0.5, momentum=0.9)),
        ("ngd", keras_hoopt.NaturalGradient(learning_rate=1.0, damping=1e-2)),
        ("newton", keras_hoopt.Newton(learning_rate=1.0, damping=1e-2)),
    ]:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10, activation="softmax")])
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", jit_compile=False)
        history = model.fit(x, y, batch_size=256, epochs=3, verbose=0, shuffle=False)
        losses[name] = history.history["loss"][-1]
    print("training loss after 6 steps:", losses)
    assert losses["ngd"] < 0.7 * losses["sgd"], losses
    assert losses["newton"] < 0.7 * losses["sgd"], losses


def test_benchmark_smoke(tmp_path, capsys):
    from keras_hoopt.benchmarks import second_order_paths

    out = tmp_path / "paths"
    assert second_order_paths.main(["--steps", "2", "--optimizers", "sgd", "newton", "--examples", "64", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| Newton (saddle-free) |" in printed and "K-FAC (all blocks) vs full Fisher" in printed
    assert {p.name for p in out.iterdir()} == {"loss_vs_steps.png", "loss_vs_steps.csv", "results.md"}
    rows = (out / "loss_vs_steps.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 * 2 * 3  # header + 2 optimizers x 2 learning rates x 3 losses
