"""step_size="quadratic_model" and damping_control="lm" against an independent quadratic model.

The reference curvature is the generalised Gauss-Newton matrix formed here, densely:
``C = mean_n J_n^T H_n J_n`` with per-example Jacobians from ``tf.GradientTape.jacobian``
and ``H_n`` written out in numpy (softmax: ``diag(p) - p p^T``). A wrong Hessian scale,
a transposed tangent or a mis-signed direction in the optimizer breaks the optimality
conditions checked here.
"""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_hoopt
from keras_hoopt import fisher
from keras_hoopt.optimizers import quadratic_model

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = (np.argmax(x[:, :3] + 0.3 * rng.normal(size=(n, 3)), axis=1)).astype("int32")
    return x, y


def _mlp(seed=1, batchnorm=False):
    keras.utils.set_random_seed(seed)
    norm = [keras.layers.BatchNormalization(name="bn")] if batchnorm else []
    return keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(8, activation="tanh", name="d1"), *norm, keras.layers.Dense(3, name="d2"),
    ])


def _flat(tensors):
    return np.concatenate([np.ravel(np.asarray(t, np.float64)) for t in tensors])


def _step_change(model, x, y):
    """How far one ``train_on_batch(x, y)`` moves the model's weights (flattened)."""
    before = _flat(model.trainable_variables)
    model.train_on_batch(x, y)
    return _flat(model.trainable_variables) - before


def _ggn_and_gradient(model, x, y):
    """Dense GGN ``C`` and gradient ``g`` of the mean softmax cross-entropy, at the current weights."""
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        logits = model(x, training=True)
        loss = LOSS(y, logits)
    g = _flat(tape.gradient(loss, variables))
    jac = tape.jacobian(logits, variables, experimental_use_pfor=False)
    n, k = logits.shape
    jac = np.concatenate([np.reshape(j.numpy(), (n, k, -1)) for j in jac], axis=2).astype(np.float64)
    p = tf.nn.softmax(logits).numpy().astype(np.float64)
    c = np.zeros((jac.shape[2],) * 2)
    for i in range(n):
        h = np.diag(p[i]) - np.outer(p[i], p[i])
        c += jac[i].T @ h @ jac[i]
    return c / n, g, float(loss)


def _optimizer(**kwargs):
    options = dict(learning_rate=1.0, damping=0.05, momentum=0.9, step_size="quadratic_model", inverse_update_interval=1,
                   kl_clip=None, min_damping=1e-8)
    options.update(kwargs)
    return keras_hoopt.KFAC(**options)


@pytest.mark.parametrize("family,from_logits", [("categorical", True), ("categorical", False),
                                                ("bernoulli", True), ("bernoulli", False), ("gaussian", False)])
def test_output_quadratic_form_matches_the_dense_output_hessian(family, from_logits):
    rng = np.random.default_rng(3)
    y_pred = rng.normal(size=(5, 4)).astype("float32")
    if not from_logits and family != "gaussian":
        y_pred = (tf.nn.softmax(y_pred) if family == "categorical" else tf.sigmoid(y_pred)).numpy()
    u, v = rng.normal(size=(2, 5, 4)).astype("float32")
    hessian = fisher.output_hessian(family, from_logits, y_pred).numpy()
    expected = np.mean(np.einsum("nk,nkl,nl->n", u, hessian, v))
    got = float(fisher.output_quadratic_form(family, from_logits, y_pred, u, v))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_softmax_output_hessian_is_the_loss_hessian():
    """For logits the expected Hessian is the Hessian of Keras's loss itself (labels do not enter)."""
    rng = np.random.default_rng(4)
    logits = tf.constant(rng.normal(size=(1, 4)).astype("float32"))
    with tf.GradientTape() as outer:
        outer.watch(logits)
        with tf.GradientTape() as inner:
            inner.watch(logits)
            loss = LOSS(np.array([2]), logits)
        grad = inner.gradient(loss, logits)
    hessian = outer.jacobian(grad, logits).numpy().reshape(4, 4)
    u, v = rng.normal(size=(2, 1, 4)).astype("float32")
    got = float(fisher.output_quadratic_form("categorical", True, logits, u, v))
    np.testing.assert_allclose(got, (u @ hessian @ v.T).item(), rtol=1e-5)


def test_minimise_in_span_solves_the_two_by_two_system_within_the_momentum_bounds():
    m = np.array([[2.0, 0.5], [0.5, 1.0]], np.float32)

    def q(c, b):
        return b @ c + 0.5 * c @ m @ c

    for b in ([-1.0, -0.3], [-1.0, 0.3], [-1.0, -3.0]):  # momentum inside, below 0, above 0.99
        b = np.array(b, np.float32)
        c, ok = quadratic_model.minimise_in_span(tf.constant(b), tf.constant(m))
        assert bool(ok)
        free = np.linalg.solve(m, -b)
        if 0 <= free[1] <= 0.99:
            np.testing.assert_allclose(c.numpy(), free, rtol=1e-5)
        else:  # the constrained optimum, found by a fine grid over the momentum
            grid = [(q(np.array([-(b[0] + m[0, 1] * mu) / m[0, 0], mu]), b), mu) for mu in np.linspace(0, 0.99, 991)]
            assert c.numpy()[1] == pytest.approx(min(grid)[1], abs=1e-3)
            assert q(c.numpy(), b) <= min(grid)[0] + 1e-6
    b = tf.constant([-1.0, 0.3])
    c, ok = quadratic_model.minimise_in_span(b, tf.constant([[2.0, 0.0], [0.0, 0.0]]))
    assert bool(ok) and c.numpy().tolist() == [0.5, 0.0]
    _, ok = quadratic_model.minimise_in_span(b, tf.constant([[0.0, 0.0], [0.0, 1.0]]))
    assert not bool(ok)


def test_levenberg_marquardt_rule():
    omega = 0.9 ** 5
    for rho, factor in ((0.1, 1 / omega), (0.5, 1.0), (0.9, omega)):
        got = float(quadratic_model.adapted_damping(tf.constant(1e-2), tf.constant(rho), 5))
        assert got == pytest.approx(1e-2 * factor, rel=1e-5)
    assert float(quadratic_model.adapted_damping(tf.constant(1e-8), tf.constant(0.9), 5)) == pytest.approx(1e-8)
    assert float(quadratic_model.adapted_damping(tf.constant(1e-3), tf.constant(0.9), 5, 1e-3)) == pytest.approx(1e-3)
    assert float(quadratic_model.reduction_ratio(1.0, 0.5, -0.25)) == pytest.approx(2.0)
    assert float(quadratic_model.reduction_ratio(1.0, 0.5, 0.25)) == 0.0  # the model promised an increase
    assert float(quadratic_model.reduction_ratio(1.0, np.inf, -0.25)) == 0.0


@pytest.mark.parametrize("products", ["one_sided_differences", "finite_differences", "forward_mode"])
@pytest.mark.parametrize("jit_compile,batchnorm", [(False, False), (True, False), (False, True)])
def test_chosen_step_minimises_the_exact_quadratic_model_in_its_span(jit_compile, batchnorm, products):
    """After the step, ``(C + lambda I) delta + g`` is orthogonal to both directions ``p`` and ``v``.

    With BatchNormalization the batch's outputs depend on each other through the batch moments;
    the Jacobian of the batch output (here and in the curvature products) includes that. Both ways
    of forming the products (one-sided and central differences, forward mode) are held to the same
    tolerance.
    """
    x, y = _data()
    model = _mlp(batchnorm=batchnorm)
    optimizer = _optimizer(quadratic_model_products=products)
    model.compile(optimizer=optimizer, loss=LOSS, jit_compile=jit_compile)
    for step in range(2):  # the velocity is not zero, and not parallel to p
        model.train_on_batch(x[32 * step: 32 * step + 32], y[32 * step: 32 * step + 32])
    xb, yb = x[64:], y[64:]
    c, g, _ = _ggn_and_gradient(model, xb, yb)
    before = _flat(model.trainable_variables)
    velocity = _flat([optimizer._momentums[i] for i in range(len(model.trainable_variables))])
    model.train_on_batch(xb, yb)
    delta = _flat(model.trainable_variables) - before
    lr, mu = optimizer.step_summary()["learning_rate"], optimizer.step_summary()["momentum"]
    assert lr > 0 and mu != 0.9 and 0 <= mu <= 0.99  # chosen, not the given momentum
    count = len(model.trainable_variables)
    np.testing.assert_allclose(_flat([optimizer._momentums[i] for i in range(count)]), delta, rtol=1e-4, atol=1e-7)
    p = -(delta - mu * velocity) / lr  # the preconditioned gradient (delta = mu v - lr p)
    assert p @ g > 0  # a descent direction
    residual = (c + 0.05 * np.eye(len(g))) @ delta + g  # the model's gradient at the chosen step

    def scale(direction):  # the size of the terms the derivative is a difference of
        return np.abs(direction) @ (np.abs(c @ delta) + 0.05 * np.abs(delta) + np.abs(g))

    assert abs(p @ residual) < 1e-3 * scale(p), (p @ residual, scale(p))
    # Karush-Kuhn-Tucker in the momentum: zero derivative inside [0, 0.99], pointing outwards on a bound.
    if mu <= 1e-6:
        assert velocity @ residual > -1e-3 * scale(velocity)
    elif mu >= 0.99 - 1e-6:
        assert velocity @ residual < 1e-3 * scale(velocity)
    else:
        assert abs(velocity @ residual) < 1e-3 * scale(velocity), (velocity @ residual, scale(velocity))
    # The chosen step beats the given learning rate and momentum on the same model.
    fixed = mu * 0 + 0.9 * velocity - 1.0 * p

    def q(d):
        return g @ d + 0.5 * d @ (c + 0.05 * np.eye(len(g))) @ d

    assert q(delta) < q(fixed) and q(delta) < 0


def test_kl_clip_bounds_the_exact_fisher_norm_of_the_chosen_step():
    x, y = _data()
    model = _mlp()
    optimizer = _optimizer(kl_clip=1e-6)
    model.compile(optimizer=optimizer, loss=LOSS, jit_compile=False)
    model.train_on_batch(x[:32], y[:32])
    c, _, _ = _ggn_and_gradient(model, x[32:64], y[32:64])
    delta = _step_change(model, x[32:64], y[32:64])
    assert optimizer.kl_clip_coefficient < 1.0
    assert delta @ c @ delta == pytest.approx(1e-6, rel=1e-3)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_a_batch_fraction_takes_the_curvature_of_the_leading_examples(jit_compile):
    """With ``quadratic_model_batch_fraction=0.25`` the trust region holds for the GGN of the batch's
    first quarter (8 of 32 examples), not for the whole batch's."""
    x, y = _data()
    model = _mlp()
    optimizer = _optimizer(kl_clip=1e-6, quadratic_model_batch_fraction=0.25)
    model.compile(optimizer=optimizer, loss=LOSS, jit_compile=jit_compile)
    model.train_on_batch(x[:32], y[:32])
    quarter, _, _ = _ggn_and_gradient(model, x[32:40], y[32:40])
    whole, _, _ = _ggn_and_gradient(model, x[32:64], y[32:64])
    delta = _step_change(model, x[32:64], y[32:64])
    assert optimizer.kl_clip_coefficient < 1.0
    assert delta @ quarter @ delta == pytest.approx(1e-6, rel=1e-3)
    assert abs(delta @ whole @ delta - 1e-6) > 1e-2 * 1e-6  # the two curvatures differ on this step
    assert optimizer.get_config()["quadratic_model_batch_fraction"] == 0.25


def test_levenberg_marquardt_rho_is_the_measured_over_the_predicted_change():
    x, y = _data()
    model = _mlp()
    optimizer = _optimizer(damping_control="lm", damping_control_interval=1, damping=0.1)
    model.compile(optimizer=optimizer, loss=LOSS, jit_compile=False)
    model.train_on_batch(x[:32], y[:32])
    xb, yb = x[32:64], y[32:64]
    damping = optimizer.current_damping()
    c, g, loss_before = _ggn_and_gradient(model, xb, yb)
    delta = _step_change(model, xb, yb)
    loss_after = float(LOSS(yb, model(xb, training=True)))
    predicted = g @ delta + 0.5 * delta @ c @ delta
    rho = (loss_after - loss_before) / predicted
    summary = optimizer.step_summary()
    assert summary["reduction_ratio"] == pytest.approx(rho, rel=2e-3, abs=1e-4)
    factor = 1 / 0.9 if rho < 0.25 else (0.9 if rho > 0.75 else 1.0)
    assert summary["damping"] == pytest.approx(damping * factor, rel=1e-5)


def _regularised_mlp(regulariser, seed=1):
    keras.utils.set_random_seed(seed)
    options = {
        "none": {},
        "kernel": {"kernel_regularizer": keras.regularizers.L2(1e-2)},
        "activity": {"activity_regularizer": keras.regularizers.L2(1e-1)},
    }[regulariser]
    return keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(8, activation="tanh", name="d1", **options), keras.layers.Dense(3, name="d2"),
    ])


def _total_loss_and_gradient(model, x, y):
    """The training loss as Keras computes it (the data loss plus ``model.losses``) and its gradient, eagerly."""
    with tf.GradientTape() as tape:
        loss = LOSS(y, model(x, training=True))
        loss = loss + tf.add_n(model.losses) if model.losses else loss
    return float(loss), _flat(tape.gradient(loss, model.trainable_variables))


@pytest.mark.parametrize("regulariser", ["none", "kernel", "activity"])
def test_levenberg_marquardt_rho_holds_with_regularisers(regulariser):
    """rho's ``L(theta)`` is the training pass's loss where a re-run would compute the same (no layer adds a
    loss in its call) and a re-run's otherwise: against Keras's own loss, regularisers included, evaluated
    eagerly before and after the step. An ``L(theta)`` without the activity regulariser's term shifts rho."""
    x, y = _data()
    model = _regularised_mlp(regulariser)
    optimizer = _optimizer(damping_control="lm", damping_control_interval=1, damping=0.1)
    model.compile(optimizer=optimizer, loss=LOSS, jit_compile=False)
    model.train_on_batch(x[:32], y[:32])
    xb, yb = x[32:64], y[32:64]
    c, _, _ = _ggn_and_gradient(model, xb, yb)
    loss_before, g = _total_loss_and_gradient(model, xb, yb)
    delta = _step_change(model, xb, yb)
    loss_after, _ = _total_loss_and_gradient(model, xb, yb)
    if regulariser != "none":
        assert loss_before - LOSS(yb, model(xb, training=True)) != 0.0  # the regulariser is in the loss
    rho = (loss_after - loss_before) / (g @ delta + 0.5 * delta @ c @ delta)
    assert optimizer.step_summary()["reduction_ratio"] == pytest.approx(rho, rel=2e-3, abs=1e-4)


def test_levenberg_marquardt_takes_the_loss_before_the_step_from_the_training_pass(monkeypatch):
    """A step that measures rho re-runs the model once more (for ``L(theta + delta)``), and twice where a
    layer adds a loss in its call or draws random numbers (then ``L(theta)`` needs a re-run too)."""

    def reruns(model):
        return _forward_passes_of_one_step(model, "one_sided_differences", monkeypatch, damping_control="lm")

    directions = _forward_passes_of_one_step(_mlp(), "one_sided_differences", monkeypatch)
    assert reruns(_regularised_mlp("none")) == reruns(_regularised_mlp("kernel")) == directions + 1
    assert reruns(_regularised_mlp("activity")) == directions + 2
    assert reruns(_dropout_mlp()) == directions + 1 + 2


@pytest.mark.parametrize("cls,interval", [(keras_hoopt.SPNGD, 1), (keras_hoopt.THOR, 1), (keras_hoopt.SPNGD, 3)])
def test_adaptive_step_and_damping_train_and_restore(tmp_path, cls, interval):
    x, y = _data(n=256)
    model = _mlp()
    optimizer = cls(learning_rate=1.0, damping=1e-2, step_size="quadratic_model",
                    damping_control="lm", damping_control_interval=2, kl_clip=None,
                    quadratic_model_interval=interval)
    model.compile(optimizer=optimizer, loss=LOSS)
    initial = float(model.evaluate(x, y, verbose=0))
    model.fit(x, y, batch_size=32, epochs=3, verbose=0)
    assert float(model.evaluate(x, y, verbose=0)) < 0.6 * initial
    summary = optimizer.step_summary()
    assert summary["damping"] != pytest.approx(1e-2) and summary["reduction_ratio"] != 0.0, summary
    config = optimizer.get_config()
    assert (config["step_size"], config["damping_control"], config["damping_control_interval"],
            config["min_damping"], config["quadratic_model_interval"]) == ("quadratic_model", "lm", 2, 1e-4, interval)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras_hoopt.load_model(path)
    assert loaded.optimizer.step_summary() == summary
    assert loaded.optimizer.quadratic_model_interval == interval
    np.testing.assert_array_equal(loaded.optimizer._unit_curvature.numpy(), optimizer._unit_curvature.numpy())
    assert cls.from_config(config).damping_control == "lm"


@pytest.mark.parametrize("kwargs,message", [
    (dict(step_size="newton"), "step_size"),
    (dict(damping_control="trust"), "damping_control"),
    (dict(step_size="fixed", damping_control="lm"), "step_size='quadratic_model'"),
    (dict(step_size="quadratic_model", damping_control="lm", damping_control_interval=0), "damping_control_interval"),
    (dict(step_size="quadratic_model", nesterov=True), "nesterov"),
    (dict(step_size="quadratic_model", damping_control="lm", min_damping=0.0), "min_damping"),
    (dict(step_size="quadratic_model", quadratic_model_batch_fraction=0.0), "quadratic_model_batch_fraction"),
    (dict(step_size="quadratic_model", quadratic_model_batch_fraction=1.5), "quadratic_model_batch_fraction"),
    (dict(quadratic_model_products="jvp"), "quadratic_model_products"),
    (dict(quadratic_model_products=None), "quadratic_model_products"),
    (dict(quadratic_model_interval=0), "quadratic_model_interval"),
    (dict(quadratic_model_interval=2.5), "quadratic_model_interval"),
    (dict(step_size="quadratic_model", damping_control="lm",
          damping=keras.optimizers.schedules.ExponentialDecay(1e-2, 10, 0.5)), "schedule"),
])
def test_bad_arguments_name_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        keras_hoopt.KFAC(**kwargs)


def test_auto_products_take_forward_mode_where_a_layer_computes_in_low_precision():
    """Differences need float32's digits: a bfloat16 layer makes "auto" forward mode."""

    class Session:
        def __init__(self, model):
            self.model = model

    full = _mlp()
    keras.utils.set_random_seed(1)
    mixed = keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(8, activation="tanh", dtype="mixed_bfloat16"),
        keras.layers.Dense(3, dtype="float32"),
    ])
    for model, expected in ((full, "one_sided_differences"), (mixed, "forward_mode")):
        qm = quadratic_model.QuadraticModel(Session(model), None, model.trainable_variables, ("categorical", True))
        assert qm._products() == expected
        explicit = quadratic_model.QuadraticModel(Session(model), None, model.trainable_variables,
                                                  ("categorical", True), products="finite_differences")
        assert explicit._products() == "finite_differences"


def test_an_unsupported_loss_is_refused_at_compile():
    model = _mlp()
    with pytest.raises(ValueError, match="does not support the loss"):
        model.compile(optimizer=_optimizer(), loss=keras.losses.Huber())


def test_tensorboard_callback_reports_the_chosen_step(tmp_path):
    x, y = _data()
    model = _mlp()
    optimizer = _optimizer(damping_control="lm", damping_control_interval=1)
    model.compile(optimizer=optimizer, loss=LOSS)
    callback = keras_hoopt.callbacks.CurvatureTensorBoard(str(tmp_path), spectra=False)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    callback.set_model(model)
    scalars = callback.scalars()
    step = optimizer.step_summary()
    assert scalars["optimizer/chosen_learning_rate"] == step["learning_rate"] > 0
    assert scalars["optimizer/chosen_momentum"] == step["momentum"]
    assert scalars["optimizer/reduction_ratio"] == step["reduction_ratio"] != 0
    assert scalars["optimizer/damping"] == pytest.approx(step["damping"])


def test_a_non_finite_curvature_product_moves_nothing_and_is_counted(monkeypatch):
    """Fault injection: the forward-mode products come back NaN (as a NaN activation would give)."""
    x, y = _data()
    model = _mlp()
    optimizer = _optimizer(damping_control="lm", damping_control_interval=1, kl_clip=1e-3)
    # Patched before the step is traced (the traced step would keep the real products).
    monkeypatch.setattr(quadratic_model.QuadraticModel, "curvature_matrix",
                        lambda self, directions: tf.fill([len(directions)] * 2, np.nan))
    model.compile(optimizer=optimizer, loss=LOSS, jit_compile=False)
    before = [v.numpy() for v in model.trainable_variables]
    damping = optimizer.current_damping()
    for start in (32, 64):
        model.train_on_batch(x[start:start + 32], y[start:start + 32])
    for a, b in zip(before, model.trainable_variables):  # every variable here is preconditioned
        np.testing.assert_array_equal(a, b.numpy())
    summary = optimizer.step_summary()
    assert summary["quadratic_model_failures"] == 2 == optimizer.health_summary()["quadratic_model_failures"]
    assert (summary["learning_rate"], summary["momentum"], summary["kl_clip_coefficient"]) == (0.0, 0.0, 1.0)
    assert optimizer.skipped_steps == 0
    assert summary["damping"] == pytest.approx(damping)  # no rho from a failed model: lambda unchanged
    assert all(not np.any(m.numpy()) for m in optimizer._momentums.values())  # the velocity restarted


def test_without_momentum_the_step_is_the_one_dimensional_minimiser():
    """momentum=0 keeps no velocity: alpha = -(g . u) / (u^T (C + lambda I) u) along u = -p."""
    x, y = _data()
    model = _mlp()
    optimizer = _optimizer(momentum=0.0)
    model.compile(optimizer=optimizer, loss=LOSS, jit_compile=False)
    model.train_on_batch(x[:32], y[:32])
    c, g, _ = _ggn_and_gradient(model, x[32:64], y[32:64])
    delta = _step_change(model, x[32:64], y[32:64])
    assert optimizer.step_summary()["momentum"] == 0.0
    residual = (c + 0.05 * np.eye(len(g))) @ delta + g
    scale = np.abs(delta) @ (np.abs(c @ delta) + 0.05 * np.abs(delta) + np.abs(g))
    assert abs(delta @ residual) < 1e-3 * scale


def _dropout_mlp(seed=1):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(8, activation="tanh", name="d1"), keras.layers.Dropout(0.3),
        keras.layers.Dense(3, name="d2"),
    ])


def _forward_passes_of_one_step(model, products, monkeypatch, damping_control=None):
    """How many times the optimizer re-runs the model while the train step is traced (and run) once
    (with ``damping_control="lm"``, a step that measures rho)."""
    x, y = _data()
    optimizer = _optimizer(quadratic_model_products=products, damping_control=damping_control, damping_control_interval=1)
    model.compile(optimizer=optimizer, loss=LOSS, jit_compile=False)
    session = optimizer._attachment.session
    reruns = []
    original = session.rerun
    monkeypatch.setattr(session, "rerun", lambda *a: reruns.append(1) or original(*a))
    model.train_on_batch(x[:32], y[:32])
    return len(reruns)


def test_one_sided_differences_reuse_the_training_output_where_a_rerun_reproduces_it(monkeypatch):
    """Two directions: central differences re-run the model four times; one-sided differences twice
    (``f(theta)`` is the training pass's output), three times where Dropout draws a new mask."""
    central = _forward_passes_of_one_step(_mlp(), "finite_differences", monkeypatch)
    one_sided = _forward_passes_of_one_step(_mlp(), "one_sided_differences", monkeypatch)
    with_dropout = _forward_passes_of_one_step(_dropout_mlp(), "one_sided_differences", monkeypatch)
    assert central > 0 and central % 4 == 0, central  # 4 per trace of the step
    assert (one_sided, with_dropout) == (central // 2, 3 * central // 4)


def test_one_sided_differences_under_dropout_match_forward_mode():
    """With Dropout the curvature is the re-run's (one mask for every pass): the one-sided step equals
    the exact forward-mode one. Against the training pass's output (another mask) it would not."""
    x, y = _data()
    chosen = {}
    for products in ("one_sided_differences", "forward_mode"):
        model = _dropout_mlp()
        optimizer = _optimizer(quadratic_model_products=products, damping_control=None)
        model.compile(optimizer=optimizer, loss=LOSS, jit_compile=False)
        for step in range(3):
            model.train_on_batch(x[32 * step: 32 * step + 32], y[32 * step: 32 * step + 32])
        summary = optimizer.step_summary()
        chosen[products] = (summary["learning_rate"], summary["momentum"])
    np.testing.assert_allclose(chosen["one_sided_differences"], chosen["forward_mode"], rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("products", ["one_sided_differences", "finite_differences", "forward_mode"])
def test_a_signed_direction_is_the_negated_direction_and_its_products_the_exact_ggn(products):
    """``direction_signs`` (the step passes ``p`` with sign -1 instead of a negated copy of ``p``):
    the products equal those of ``-p`` given as is, the given norms set the same steps, and both
    match ``U^T C U`` of the dense GGN, ``U = (-p, v)``; a sign on the wrong side fails it."""
    from keras_hoopt.capture import ForwardRecord

    class Session:  # what QuadraticModel uses of the capture session: the model's call, recording nothing
        def __init__(self, model):
            self.model = model

        def rerun(self, args, kwargs):
            return self.model(*args, **kwargs)

    x, y = _data(n=48)
    model = _mlp()
    record = ForwardRecord()
    record.model_call = ((tf.constant(x),), {"training": True})
    record.model_output = model(x, training=True)
    rng = np.random.default_rng(3)
    p = [tf.constant(rng.normal(size=v.shape).astype("float32")) for v in model.trainable_variables]
    # v leans on -p, so that the cross term is large and a sign on the wrong side shows
    v = [tf.constant((0.3 * rng.normal(size=t.shape) - 0.5 * t.numpy()).astype("float32")) for t in p]
    c, _, _ = _ggn_and_gradient(model, x, y)
    u = np.stack([-_flat(p), _flat(v)], axis=1)
    exact = u.T @ c @ u

    def curvature(directions, **options):
        qm = quadratic_model.QuadraticModel(Session(model), record, model.trainable_variables, ("categorical", True),
                                            products=products, **options)
        return qm.curvature_matrix(directions).numpy()

    negated = curvature([[-t for t in p], v])
    norms = [tf.linalg.global_norm(p), tf.linalg.global_norm(v)]
    signed = curvature([p, v], direction_signs=[-1.0, 1.0], direction_norms=norms)
    np.testing.assert_allclose(signed, negated, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(signed, exact, rtol=2e-2, atol=1e-4 * np.abs(exact).max())
    assert abs(exact[0, 1]) > 0.5 * np.sqrt(exact[0, 0] * exact[1, 1])


def _recovered_directions(optimizer, model, step_batch):
    """Run one step on ``step_batch``; ``(p, v, lr, mu, delta)`` from the weights and velocities
    (``delta = mu v - lr p``, the velocity after the step is ``delta``)."""
    count = len(model.trainable_variables)
    before = _flat(model.trainable_variables)
    velocity = _flat([optimizer._momentums[i] for i in range(count)])
    model.train_on_batch(*step_batch)
    delta = _flat(model.trainable_variables) - before
    lr, mu = optimizer.step_summary()["learning_rate"], optimizer.step_summary()["momentum"]
    return -(delta - mu * velocity) / lr, velocity, lr, mu, delta


def _span_minimiser(b, m, max_momentum=quadratic_model.MAX_MOMENTUM):
    """numpy: ``argmin b . c + 1/2 c^T m c`` over ``c_2`` in ``[0, max_momentum]`` (convex: the solve, or a bound)."""
    c = np.linalg.solve(m, -b)
    if not 0.0 <= c[1] <= max_momentum:
        c[1] = min(max(c[1], 0.0), max_momentum)
        c[0] = -(b[0] + m[0, 1] * c[1]) / m[0, 0]
    return c


def test_between_measurements_the_model_is_the_last_curvature_per_unit_length(monkeypatch):
    """``quadratic_model_interval=2``: step 2 measures ``R_ij = u_i^T C u_j / (|u_i| |u_j|)`` (checked
    against the dense GGN of its batch); step 3 does not measure, and its (lr, momentum) minimise the
    model with step 2's ``R`` at step 3's lengths, ``b`` and Gram matrix, which differs from step 3's
    own exact model."""
    monkeypatch.setattr(quadratic_model, "MEASURED_FIRST_STEPS", 0)
    x, y = _data(n=128)
    model = _mlp()
    damping = 0.05
    optimizer = _optimizer(quadratic_model_interval=2, quadratic_model_products="forward_mode", damping_control=None)
    model.compile(optimizer=optimizer, loss=LOSS, jit_compile=False)
    batches = [(x[32 * s: 32 * s + 32], y[32 * s: 32 * s + 32]) for s in range(4)]
    for batch in batches[:2]:
        model.train_on_batch(*batch)

    def unit_products(c, directions):
        u = np.stack(directions)
        n = np.linalg.norm(u, axis=1)
        return (u @ c @ u.T) / np.outer(n, n)

    c2, _, _ = _ggn_and_gradient(model, *batches[2])
    p2, v2, _, _, _ = _recovered_directions(optimizer, model, batches[2])
    measured = unit_products(c2, [-p2, v2])
    np.testing.assert_allclose(optimizer._unit_curvature.numpy(), measured, rtol=2e-3, atol=1e-6)

    c3, g3, _ = _ggn_and_gradient(model, *batches[3])
    p3, v3, lr3, mu3, _ = _recovered_directions(optimizer, model, batches[3])
    np.testing.assert_allclose(optimizer._unit_curvature.numpy(), measured, rtol=2e-3, atol=1e-6)  # not measured
    u = np.stack([-p3, v3])
    norms = np.linalg.norm(u, axis=1)
    b = u @ g3
    stale = measured * np.outer(norms, norms) + damping * (u @ u.T)
    np.testing.assert_allclose([lr3, mu3], _span_minimiser(b, stale), rtol=2e-3, atol=1e-6)
    exact = u @ c3 @ u.T + damping * (u @ u.T)  # what step 3 would have chosen had it measured
    assert not np.allclose(_span_minimiser(b, exact), [lr3, mu3], rtol=2e-2)


def test_between_measurements_a_direction_without_length_or_a_non_finite_measurement_keeps_the_stored_products():
    """The estimate, the stored ``R`` and the velocity flag of :func:`between_measurements`, against numpy."""
    stored = np.array([[2.0, 0.5], [0.5, 3.0]], np.float32)
    measured = np.array([[8.0, 3.0], [3.0, 9.0]], np.float32)
    norms = np.array([2.0, 3.0], np.float32)
    curvature, per_unit, keep, seen = quadratic_model.between_measurements(
        tf.constant(measured), tf.constant(False), tf.constant(stored), tf.constant(norms)
    )
    np.testing.assert_allclose(curvature, stored * np.outer(norms, norms))
    assert not bool(keep) and bool(seen)
    curvature, per_unit, keep, seen = quadratic_model.between_measurements(
        tf.constant(measured), tf.constant(True), tf.constant(stored), tf.constant(norms)
    )
    np.testing.assert_allclose(curvature, measured)
    np.testing.assert_allclose(per_unit, measured / np.outer(norms, norms))
    assert bool(keep) and bool(seen)
    # The first step: no velocity (length 0), nothing stored yet: its entries stay 0 and it is not "seen".
    zero = np.zeros((2, 2), np.float32)
    _, per_unit, keep, _ = quadratic_model.between_measurements(
        tf.constant(measured), tf.constant(True), tf.constant(zero), tf.constant([2.0, 0.0])
    )
    np.testing.assert_allclose(per_unit, [[2.0, 0.0], [0.0, 0.0]])
    assert bool(keep)
    _, _, _, seen = quadratic_model.between_measurements(
        tf.constant(measured), tf.constant(False), tf.constant(per_unit), tf.constant(norms)
    )
    assert not bool(seen)
    _, _, keep, _ = quadratic_model.between_measurements(
        tf.constant(np.full((2, 2), np.nan, np.float32)), tf.constant(True), tf.constant(stored), tf.constant(norms)
    )
    assert not bool(keep)
