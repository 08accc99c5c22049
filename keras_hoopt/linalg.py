"""Linear algebra for curvature factors: damped inverses that never return NaN.

Everything here is plain TensorFlow that compiles under XLA (Cholesky, not
``eigh``: XLA expands ``eigh`` into Jacobi sweeps that are 10-50x slower).
In TF 2.21 a Cholesky factorisation of a matrix that is not positive definite
yields NaN (eagerly, in graphs and under XLA alike) instead of raising, so a
failed factorisation is detected by a finiteness check and retried with more
damping; if every attempt fails, the caller keeps its last good inverse.

On CPU, XLA's own Cholesky is about 4x slower than TensorFlow's (1569x1569:
0.40 s vs 0.10 s on the 2-core development machine); Keras's
``jit_compile="auto"`` already leaves XLA off on machines without a GPU, and
an explicit ``jit_compile=True`` there makes every refresh that much slower.
"""

import tensorflow as tf

#: Damping multipliers tried, in order, when a damped factorisation fails.
RETRY_GROWTH = 10.0
MAX_ATTEMPTS = 4


def all_finite(x):
    return tf.reduce_all(tf.math.is_finite(x))


def all_finite_together(tensors):
    """One fused check that every element of every tensor is finite (a scalar bool).

    ``x * 0`` is 0 for a finite ``x`` and NaN for NaN or +-Inf, so the sum of
    those products is finite exactly when everything is; unlike a plain sum it
    cannot overflow on large finite values.
    """
    if not tensors:
        return tf.constant(True)
    values = [t.values if isinstance(t, tf.IndexedSlices) else t for t in tensors]  # sparse: its rows
    return tf.math.is_finite(tf.add_n([tf.reduce_sum(tf.cast(v, tf.float32) * 0.0) for v in values]))


def frobenius_norm(x):
    """``||X||_F``, bit for bit ``tf.norm(x)``, without its reshaping op and Python checks (traced per statistic)."""
    return tf.sqrt(tf.reduce_sum(tf.square(x)))


def symmetrize(matrix):
    return 0.5 * (matrix + tf.linalg.matrix_transpose(matrix))


def _spd_inverse(matrix):
    """Inverse of a (batch of) symmetric positive definite matrices.

    Uses the closed form for 1x1 and 2x2 blocks and Cholesky otherwise; returns
    non-finite values (never raises) if a matrix is not positive definite.
    """
    size = matrix.shape[-1]
    if size == 1:
        # A non-positive 1x1 matrix is not positive definite: NaN, as Cholesky.
        return tf.where(matrix > 0.0, tf.math.reciprocal(matrix), tf.constant(float("nan"), matrix.dtype))
    if size == 2:
        a, b, d = matrix[..., 0, 0], matrix[..., 0, 1], matrix[..., 1, 1]
        det = a * d - b * b
        # A non-positive determinant or diagonal means "not positive definite":
        # report it as NaN, as a failed Cholesky would.
        bad = tf.logical_or(det <= 0.0, a <= 0.0)
        inv_det = tf.where(bad, tf.constant(float("nan"), matrix.dtype), 1.0 / det)
        row0 = tf.stack([d, -b], axis=-1)
        row1 = tf.stack([-b, a], axis=-1)
        return tf.stack([row0, row1], axis=-2) * inv_det[..., None, None]
    return _cholesky_inverse(matrix)


def _retried(attempt, matrix, damping):
    """Run ``attempt(matrix + damping * RETRY_GROWTH**k * I)`` for k = 0, 1, ... until finite."""
    eye = tf.eye(tf.shape(matrix)[-1], dtype=matrix.dtype)

    def cond(k, inverse, ok):
        return tf.logical_and(k < MAX_ATTEMPTS, tf.logical_not(ok))

    def body(k, inverse, ok):
        growth = tf.pow(tf.cast(RETRY_GROWTH, matrix.dtype), tf.cast(k, matrix.dtype))
        inverse = attempt(matrix + damping * growth * eye)
        inverse.set_shape(matrix.shape)  # damping broadcasts against the matrix, not beyond
        return k + 1, inverse, all_finite(inverse)

    _, inverse, ok = tf.while_loop(cond, body, (tf.constant(0), tf.zeros_like(matrix), tf.constant(False)))
    return inverse, ok


#: Factors from this size on are inverted by halves (:func:`_cholesky_inverse`); for smaller ones
#: the blocks' extra ops cost more than they save.
BLOCKED_INVERSE_MIN_SIZE = 512
#: Levels of halving in the blocked inverse (each level halves every block again, whatever its size).
BLOCKED_INVERSE_DEPTH = 1


def _identity_like(matrix):
    shape = tf.shape(matrix)
    return tf.eye(shape[-1], batch_shape=shape[:-2], dtype=matrix.dtype)


def _blocks(top_left, top_right, bottom_left, bottom_right):
    return tf.concat([tf.concat([top_left, top_right], -1), tf.concat([bottom_left, bottom_right], -1)], -2)


def _lower_triangular_inverse(lower, depth):
    """``L^-1`` of a lower-triangular ``L``, by halves ``depth`` times (0: one triangular solve)::

        [[L11, 0], [L21, L22]]^-1 = [[L11^-1, 0], [-L22^-1 L21 L11^-1, L22^-1]]

    The triangular solve against the identity does not use the zeros of its
    right-hand side and runs at a tenth of a matrix product's speed on CPU
    (1569 x 1569: 34 ms against 19 for the product ``L^-T L^-1``); by halves,
    most of the work is two products of half the size.
    """

    if depth == 0:
        return tf.linalg.triangular_solve(lower, _identity_like(lower), lower=True)
    s = tf.shape(lower)[-1] // 2
    inverse_11 = _lower_triangular_inverse(lower[..., :s, :s], depth - 1)
    inverse_22 = _lower_triangular_inverse(lower[..., s:, s:], depth - 1)
    inverse_21 = -tf.linalg.matmul(inverse_22, tf.linalg.matmul(lower[..., s:, :s], inverse_11))
    return _blocks(inverse_11, tf.zeros_like(lower[..., :s, s:]), inverse_21, inverse_22)


def _lower_gram(lower, depth):
    """``L^T L`` of a lower-triangular ``L``, by halves ``depth`` times (the zero block skipped)::

        [[L11, 0], [L21, L22]]^T [[L11, 0], [L21, L22]]
            = [[L11^T L11 + L21^T L21, L21^T L22], [L22^T L21, L22^T L22]]
    """

    if depth == 0:
        return tf.linalg.matmul(lower, lower, transpose_a=True)
    s = tf.shape(lower)[-1] // 2
    lower_21, lower_22 = lower[..., s:, :s], lower[..., s:, s:]
    bottom_left = tf.linalg.matmul(lower_22, lower_21, transpose_a=True)
    top_left = _lower_gram(lower[..., :s, :s], depth - 1) + tf.linalg.matmul(lower_21, lower_21, transpose_a=True)
    return _blocks(top_left, tf.linalg.matrix_transpose(bottom_left), bottom_left, _lower_gram(lower_22, depth - 1))


def _cholesky_inverse(matrix):
    """``matrix^-1 = L^-T L^-1`` by Cholesky, for any (batch of) size: shapes are read at run time.

    From ``BLOCKED_INVERSE_MIN_SIZE`` rows on, ``L^-1`` and the product are
    formed by halves (:func:`_lower_triangular_inverse`, :func:`_lower_gram`):
    the same factorisation and products to rounding (against numpy's float64
    inverse of a damped factor of condition 1e4: max relative error 9e-5
    either way), in about half the time (2-core machine: 1569 x 1569 in 43 ms
    against 79 whole and 100 by ``cholesky_solve`` against the identity;
    1001: 14 against 23; 785: 8.4 against 12; 512: 5.0 against 6.3). Smaller
    matrices take the whole-matrix branch of the same graph (the condition
    costs about 0.02 ms). One level of halves (``BLOCKED_INVERSE_DEPTH``): a
    second and third save another 10% and add 0.2 s and 0.7 s to the trace.
    """
    chol = tf.linalg.cholesky(matrix)

    def inverse(depth):
        return lambda: symmetrize(_lower_gram(_lower_triangular_inverse(chol, depth), depth))

    return tf.cond(tf.shape(matrix)[-1] >= BLOCKED_INVERSE_MIN_SIZE, inverse(BLOCKED_INVERSE_DEPTH), inverse(0))


_SHARED_FUNCTIONS = {}
#: The name scope of every shared function's ops.
SHARED_FUNCTION_SCOPE = "shared_function"


def shared_function(python_function, input_signature):
    """``python_function`` as one graph function, called (not inlined) by every graph that uses it.

    Inlined, each factor's refresh (a Cholesky inverse with its retry
    ``while_loop``, a range finder) is its own copy in the train step: on the
    deep autoencoder those copies cost more of the first step's tracing, graph
    optimisation and executor set-up than their own math. With shapes left
    unknown (``input_signature`` of ``None`` dimensions) one function serves
    every factor: traced, optimised and instantiated once, each call a
    function call at run time (docs/benchmarks.md, "One function per refresh
    kind"). ``python_function`` must not read static shapes of its inputs;
    callers restore them on the outputs. One function per
    ``(python_function, input_signature)``, kept for the process.
    """
    key = (python_function, tuple((tuple(spec.shape.as_list()) if spec.shape.rank is not None else None, spec.dtype)
                                  for spec in input_signature))
    if key not in _SHARED_FUNCTIONS:

        def scoped(*args):
            # The body's ops do not carry the caller's name scope: this one says where they come from
            # (the per-stage profile, keras_hoopt.benchmarks.profile, attributes them by it).
            with tf.name_scope(f"{SHARED_FUNCTION_SCOPE}/{python_function.__name__}"):
                return python_function(*args)

        _SHARED_FUNCTIONS[key] = tf.function(
            scoped, input_signature=input_signature, autograph=False, experimental_attributes={"_noinline": True},
        )
    return _SHARED_FUNCTIONS[key]


def _retried_cholesky_inverse(matrix, damping):
    return _retried(_cholesky_inverse, matrix, damping)


def damped_inverse(matrix, damping):
    """``(matrix + damping * I)^-1`` with retries at 10x, 100x, 1000x damping.

    Args:
        matrix: symmetric PSD matrix ``[..., n, n]``.
        damping: scalar tensor added to the diagonal (or one that broadcasts
            against a batch of matrices, ``[batch, 1, 1]``).

    Returns:
        ``(inverse, ok)``: ``ok`` is False when every attempt produced
        non-finite values (the inverse is then not to be used). A batch of
        matrices (BatchNorm's per-channel 2x2 blocks) retries as a whole: one
        failing block raises the damping of the batch.
    """
    matrix = tf.convert_to_tensor(matrix)
    damping = tf.cast(damping, matrix.dtype)
    size = matrix.shape[-1]
    if size is not None and size <= 2:  # closed forms, a handful of element-wise ops: inline
        return _retried(_spd_inverse, matrix, damping)
    signature = [tf.TensorSpec([None] * matrix.shape.rank, matrix.dtype), tf.TensorSpec(None, matrix.dtype)]
    inverse, ok = shared_function(_retried_cholesky_inverse, signature)(matrix, damping)
    inverse.set_shape(matrix.shape)
    ok.set_shape([])
    return inverse, ok


def mean_eigenvalue(matrix):
    """``tr(M) / dim(M)`` of a square matrix."""
    return tf.linalg.trace(matrix) / tf.cast(tf.shape(matrix)[-1], matrix.dtype)


def pi_damping(a_factor, g_factor):
    """Martens & Grosse's factored-Tikhonov ratio ``pi = sqrt(mean eig A / mean eig G)``.

    Falls back to 1 when either factor has a non-positive or non-finite trace.
    """
    ratio = mean_eigenvalue(a_factor) / mean_eigenvalue(g_factor)
    usable = tf.logical_and(tf.math.is_finite(ratio), ratio > 0.0)
    return tf.where(usable, tf.sqrt(tf.where(usable, ratio, 1.0)), tf.ones_like(ratio))


def _damped_a_inverse(a_factor, g_factor, damping):
    return damped_inverse(a_factor, pi_damping(a_factor, g_factor) * tf.sqrt(damping))


def _damped_g_inverse(a_factor, g_factor, damping):
    return damped_inverse(g_factor, tf.sqrt(damping) / pi_damping(a_factor, g_factor))


def kronecker_factor_inverse(name, a_factor, g_factor, damping):
    """``(F + d_F I)^-1`` and ``ok`` of factor ``name`` (``"A"`` or ``"G"``) of ``A (x) G``.

    ``d_A = pi sqrt(damping)``, ``d_G = sqrt(damping) / pi`` with :func:`pi_damping`
    (Martens & Grosse's factored Tikhonov damping). One graph function per
    factor side, shared by every block (:func:`shared_function`): the traces,
    the inverse and its retries are traced and optimised once, not once per factor.
    """
    spec = tf.TensorSpec([None, None], tf.float32)
    function = _damped_a_inverse if name == "A" else _damped_g_inverse
    inverse, ok = shared_function(function, [spec, spec, tf.TensorSpec([], tf.float32)])(
        a_factor, g_factor, tf.cast(damping, tf.float32)
    )
    inverse.set_shape((a_factor if name == "A" else g_factor).shape)
    ok.set_shape([])
    return inverse, ok


def split_damped_inverse(matrix, damping, split_dim):
    """``({"blocks": [n, s, s], "tail": [r, r]}, ok)``: the damped inverses of ``matrix``'s diagonal
    ``split_dim`` blocks, one batched inverse for the ``n = d // s`` whole ones (``"tail"`` only where
    ``s`` does not divide ``d``); ``matrix`` must be larger than ``split_dim``."""
    full, rest = divmod(int(matrix.shape[-1]), int(split_dim))
    s = int(split_dim)
    blocks = tf.stack([matrix[i * s:(i + 1) * s, i * s:(i + 1) * s] for i in range(full)])
    inverses, ok = damped_inverse(blocks, damping)
    parts = {"blocks": inverses}
    if rest:
        parts["tail"], tail_ok = damped_inverse(matrix[full * s:, full * s:], damping)
        ok = tf.logical_and(ok, tail_ok)
    return parts, ok


def block_diagonal(parts):
    """The dense ``[d, d]`` matrix of a :func:`split_damped_inverse` state."""
    pieces = list(tf.unstack(parts["blocks"])) + ([parts["tail"]] if "tail" in parts else [])
    return tf.linalg.LinearOperatorBlockDiag([tf.linalg.LinearOperatorFullMatrix(p) for p in pieces]).to_dense()


def block_diagonal_damped_inverse(matrix, damping, split_dim):
    """THOR's split inverse: invert the diagonal ``split_dim`` blocks of ``matrix``.

    The off-diagonal blocks are dropped, so the cost is ``O(d * split_dim^2)``
    instead of ``O(d^3)``; exact when ``d <= split_dim``. Returns the dense
    ``[d, d]`` block-diagonal inverse and ``ok`` (as :func:`damped_inverse`):
    for the blocks that keep a dense inverse (embeddings, recurrent and
    separable layers); a Kronecker block keeps the blocks themselves
    (:mod:`keras_hoopt.blocks.split`).
    """
    if split_dim is None or int(matrix.shape[-1]) <= split_dim:
        return damped_inverse(matrix, damping)
    parts, ok = split_damped_inverse(matrix, damping, split_dim)
    return block_diagonal(parts), ok
