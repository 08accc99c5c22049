"""Which output gradients the Fisher is built from: empirical or Monte-Carlo.

``fisher="empirical"`` uses the gradient of the training loss itself (the
training labels): free, but a biased curvature estimate (Kunstner et al. 2019).

``fisher="auto"`` (the default of K-FAC, SP-NGD and THOR) is ``"mc"`` where
the loss has a sampler below and the model's one output is ``[batch, K]``
(the case measured: it tied or beat the empirical Fisher on every benchmark
workload, and only it lets the autoencoder reach Adam's best loss), and
``"empirical"`` otherwise (other losses, several outputs, sequence outputs,
``attach(model)`` without a loss, a multi-replica ``tf.distribute`` strategy);
see :func:`auto_output_sampler`.

``fisher="mc"`` draws one label per example from the model's predictive
distribution and back-propagates the loss of those labels (a second, cheaper
backward pass that stops at the supported layers' outputs). The distributions
are chosen so that ``E[g g^T]`` over the sampled labels equals the expected
Hessian of the *Keras* loss w.r.t. the model output (the generalised
Gauss-Newton matrix, which is the Fisher of the loss's likelihood):

================================  ==========================================
loss                              sampled labels
================================  ==========================================
(sparse) categorical CE           ``Categorical(logits or probs)``
binary CE (mean over last axis)   ``Bernoulli``; loss scaled by ``1/sqrt(D)``
mean squared error (last axis)    ``Normal(y_pred, sigma^2 = D/2)``
================================  ==========================================
"""

import keras
import tensorflow as tf

FISHER_TYPES = ("auto", "empirical", "mc")

_SUPPORTED = {
    "sparse_categorical_crossentropy": "categorical",
    "categorical_crossentropy": "categorical",
    "binary_crossentropy": "bernoulli",
    "mean_squared_error": "gaussian",
}


def loss_identity(loss):
    """``(family, from_logits)`` of a Keras loss, or ``None`` if unsupported."""
    if isinstance(loss, str):
        try:
            loss = keras.losses.get(loss)
        except ValueError:
            return None
    fn, kwargs = loss, {}
    if isinstance(loss, keras.losses.Loss):
        fn = getattr(loss, "fn", None)
        kwargs = dict(getattr(loss, "_fn_kwargs", {}) or {})
    name = getattr(fn, "__name__", None)
    family = _SUPPORTED.get(name)
    if family is None:
        return None
    return family, bool(kwargs.get("from_logits", False))


def _describe(loss):
    if isinstance(loss, str):
        return repr(loss)
    return getattr(loss, "name", None) or getattr(loss, "__name__", None) or type(loss).__name__


def _sample_categorical(logits, seed):
    """One label per row of ``logits`` (``[..., K]``), int32, no gradient."""
    rows = tf.reshape(logits, [-1, tf.shape(logits)[-1]])
    draws = tf.random.stateless_categorical(rows, 1, seed=seed, dtype=tf.int32)
    return tf.stop_gradient(tf.reshape(draws, tf.shape(logits)[:-1]))


def make_output_sampler(loss):
    """Sampled-label loss function ``(y_pred, seed) -> scalar`` for ``fisher="mc"``.

    The scalar is a *sum* over examples, so its gradient w.r.t. a layer output
    is already the per-example gradient ``g``.

    Raises:
        ValueError: for a loss (or a multi-output model) with no supported
            predictive distribution.
    """
    if isinstance(loss, (list, tuple, dict)):
        if len(loss) != 1:
            raise ValueError(
                "fisher='mc' supports single-output models with one loss; got "
                f"{len(loss)} losses. Use fisher='empirical'."
            )
        loss = list(loss.values())[0] if isinstance(loss, dict) else loss[0]
    identity = loss_identity(loss) if loss is not None else None
    if identity is None:
        raise ValueError(
            f"fisher='mc' does not support the loss {_describe(loss)}: supported "
            "losses are sparse_categorical_crossentropy, categorical_crossentropy, "
            "binary_crossentropy and mean_squared_error (as strings, functions or "
            "keras.losses objects). Use fisher='empirical' for other losses."
        )
    family, from_logits = identity

    def sampled_loss(y_pred, seed):
        if isinstance(y_pred, (list, tuple)):
            if len(y_pred) != 1:
                raise ValueError("fisher='mc' supports single-output models only.")
            y_pred = y_pred[0]
        if isinstance(y_pred, dict):
            y_pred = list(y_pred.values())[0]
        y_pred = tf.cast(y_pred, tf.float32)
        seed = tf.cast(seed, tf.int32)
        if family == "categorical":
            logits = y_pred if from_logits else tf.math.log(tf.clip_by_value(y_pred, 1e-7, 1.0))
            # A NaN/Inf output (a bad batch) would sample an invalid label, on which the sparse
            # cross-entropy kernel raises: sample from finite logits instead. The gradients are
            # non-finite through the bad activations anyway, so the step is skipped as it would be
            # with the empirical Fisher.
            logits = tf.where(tf.math.is_finite(logits), logits, tf.zeros_like(logits))
            labels = _sample_categorical(logits, seed)
            return tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
        width = tf.cast(tf.shape(y_pred)[-1], tf.float32)
        if family == "bernoulli":
            if from_logits:
                probs = tf.sigmoid(y_pred)
                log_p0, log_p1 = -tf.math.softplus(y_pred), -tf.math.softplus(-y_pred)
            else:
                probs = tf.clip_by_value(y_pred, 1e-7, 1 - 1e-7)
                log_p0, log_p1 = tf.math.log1p(-probs), tf.math.log(probs)
            labels = tf.stop_gradient(
                tf.cast(tf.random.stateless_uniform(tf.shape(probs), seed=seed) < probs, tf.float32)
            )
            log_prob = tf.math.multiply_no_nan(log_p0, 1 - labels) + tf.math.multiply_no_nan(log_p1, labels)
            return -tf.reduce_sum(log_prob) / tf.sqrt(width)
        # gaussian: Keras MSE = mean over the last axis = NLL of N(y_pred, D/2).
        noise = tf.reshape(tf.random.stateless_normal([tf.size(y_pred)], seed=seed), tf.shape(y_pred))
        labels = tf.stop_gradient(y_pred + noise * tf.sqrt(width / 2.0))
        return tf.reduce_sum(tf.square(labels - y_pred)) / width

    return sampled_loss


def auto_output_sampler(loss):
    """The sampler of ``fisher="auto"``: ``None`` where the empirical Fisher is used instead.

    ``None`` for a missing or unsupported loss (or several losses), and under a
    ``tf.distribute`` strategy with several replicas in sync. Otherwise a
    sampler like :func:`make_output_sampler`'s that returns ``None`` at trace
    time for an output that is not one ``[batch, K]`` tensor: for sequence
    outputs (``[batch, T, K]``) the sampled gradients would not carry the
    ``1/T`` of Keras's mean over positions nor the loss's padding mask, and
    that case was not measured.
    """
    if loss is None or tf.distribute.get_strategy().num_replicas_in_sync > 1:
        # Under a multi-replica tf.distribute strategy the sampled backward pass runs inside the
        # step's tf.cond, where a cross-replica op in the forward pass (synchronized
        # BatchNormalization) cannot merge_call: the empirical Fisher there (Horovod is fine).
        return None
    try:
        sampler = make_output_sampler(loss)
    except ValueError:
        return None

    def sampled_loss(y_pred, seed):
        outputs = tf.nest.flatten(y_pred)
        if len(outputs) != 1 or outputs[0].shape.rank != 2:
            return None
        return sampler(outputs[0], seed)

    return sampled_loss


def output_hessian(family, from_logits, y_pred):
    """``E_y[r r^T]``, ``r = d loss_n / d y_pred_n``, ``y ~`` the loss's predictive distribution.

    The closed form of what :func:`make_output_sampler`
    samples (same distributions, same scales): the expected Hessian of one
    example's Keras loss w.r.t. the model output. ``y_pred``: ``[N, K]``;
    returns ``[N, K, K]``.
    """
    y_pred = tf.cast(y_pred, tf.float32)
    width = tf.cast(tf.shape(y_pred)[-1], tf.float32)
    if family == "categorical":
        if from_logits:
            p = tf.nn.softmax(y_pred)
            return tf.linalg.diag(p) - p[:, :, None] * p[:, None, :]
        # Sampler: logits = log(clip(y)); q = softmax(logits); r = (q - e_y) / clip(y).
        clipped = tf.clip_by_value(y_pred, 1e-7, 1.0)
        q = clipped / tf.reduce_sum(clipped, axis=-1, keepdims=True)
        inner = tf.linalg.diag(q) - q[:, :, None] * q[:, None, :]
        return inner / (clipped[:, :, None] * clipped[:, None, :])
    if family == "bernoulli":
        if from_logits:
            s = tf.sigmoid(y_pred)
            return tf.linalg.diag(s * (1.0 - s) / width)
        p = tf.clip_by_value(y_pred, 1e-7, 1.0 - 1e-7)
        return tf.linalg.diag(1.0 / (p * (1.0 - p)) / width)
    # gaussian: Keras MSE = mean over the K outputs; its Hessian is (2 / K) I.
    n = tf.shape(y_pred)[0]
    k = tf.shape(y_pred)[1]
    return tf.eye(k, batch_shape=[n]) * (2.0 / width)


def output_quadratic_form(family, from_logits, y_pred, u, v):
    """``mean_n u_n^T H_n v_n`` with ``H_n`` of :func:`output_hessian`, without forming ``H_n``.

    ``y_pred``, ``u``, ``v``: ``[..., K]`` (the model output and two tangents of
    it, e.g. Jacobian-vector products); every leading position is one row of
    the Keras loss's mean. Costs ``O(N K)``, where the dense ``[N, K, K]``
    Hessian of a 784-pixel autoencoder output would not fit in memory.
    """
    width = tf.shape(y_pred)[-1]
    y_pred, u, v = (tf.reshape(tf.cast(t, tf.float32), [-1, width]) for t in (y_pred, u, v))
    k = tf.cast(width, tf.float32)
    if family == "categorical":
        if from_logits:
            p = tf.nn.softmax(y_pred)
            per_row = tf.reduce_sum(p * u * v, -1) - tf.reduce_sum(p * u, -1) * tf.reduce_sum(p * v, -1)
        else:
            clipped = tf.clip_by_value(y_pred, 1e-7, 1.0)
            q = clipped / tf.reduce_sum(clipped, axis=-1, keepdims=True)
            us, vs = u / clipped, v / clipped
            per_row = tf.reduce_sum(q * us * vs, -1) - tf.reduce_sum(q * us, -1) * tf.reduce_sum(q * vs, -1)
    elif family == "bernoulli":
        if from_logits:
            s = tf.sigmoid(y_pred)
            weight = s * (1.0 - s)
        else:
            p = tf.clip_by_value(y_pred, 1e-7, 1.0 - 1e-7)
            weight = 1.0 / (p * (1.0 - p))
        per_row = tf.reduce_sum(weight * u * v, -1) / k
    else:  # gaussian
        per_row = tf.reduce_sum(u * v, -1) * (2.0 / k)
    return tf.reduce_mean(per_row)
