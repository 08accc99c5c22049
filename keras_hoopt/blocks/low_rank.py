"""The low-rank preconditioner form of a Kronecker block: wide factors as top eigenpairs plus identity.

On a wide layer the exact preconditioner ``A^-1 dW G^-1`` costs
``d_in d_out (d_in + d_out)`` multiply-adds every step, ``(d_in + d_out) / 3B``
times the layer's gradient at batch ``B`` (4.6x for a 785x1000 layer at batch
128). This form keeps, for each factor ``F`` (size ``d``) of at least
:data:`MIN_SIZE_PER_RANK` times ``rank``, only its top ``k = rank``
eigenpairs ``(U, s)`` and replaces the other eigenvalues by their mean
``rho = (tr F - sum_i s_i) / (d - k)`` (so the trace is kept)::

    F~ = U diag(s) U^T + rho (I - U U^T)

whose damped inverse is, exactly (Woodbury),

    (F~ + c I)^-1 = I / (rho + c) + U diag(1 / (s + c) - 1 / (rho + c)) U^T

with ``c`` the factor's share of the damping (K-FAC's factored Tikhonov
damping: ``pi sqrt(l)`` for ``A``, ``sqrt(l) / pi`` for ``G``). Applied to the
``[d_in, d_out]`` gradient matrix, a low-rank ``A`` costs ``2 k d_in d_out``
instead of ``d_in^2 d_out``, a low-rank ``G`` likewise. Smaller factors keep
their exact damped inverse (below ``4k`` the saving is small), so the form is
chosen per factor by size.

The eigenpairs come from a randomized range finder with power iterations
(Halko, Martinsson & Tropp 2011, algorithms 4.4 and 5.1): a fixed Gaussian
sketch ``Omega`` of ``k + OVERSAMPLING`` columns, ``Q = orth(F^(q+1) Omega)``
re-orthonormalised after every product (``q = POWER_ITERATIONS``), then the
eigendecomposition of ``Q^T F Q``. A refresh costs ``O(d^2 (k + p))`` against
the Cholesky inverse's ``O(d^3)``; the refresh policy decides when, as for the
inverses. In operator norm the approximation's error against the exact damped
inverse is ``max_{i > k} |1 / (s_i + c) - 1 / (rho + c)|`` (the range
finder adds little where the spectrum falls off after ``k``;
``tests/test_low_rank.py`` checks both on a matrix with a known spectrum).

State of a low-rank factor: ``{"basis": [d, k], "weights": [k], "tail_inverse": [1]}``
(``weights = 1/(s + c) - 1/(rho + c)``, ``tail_inverse = 1/(rho + c)``);
before the first refresh they are zeros, zeros and one: the identity.
"""

import functools

import tensorflow as tf

from keras_hoopt import linalg
from keras_hoopt.blocks.forms import (
    form_type, kronecker_factored, precondition_by_factors, register_form, require_full_factors,
)
from keras_hoopt.blocks.split import with_split

#: A factor takes the low-rank form where its size is at least this many times the rank.
MIN_SIZE_PER_RANK = 4
#: ``preconditioner="auto"`` takes the low-rank form on layers whose narrower factor is at least this
#: many times the rank (:func:`_auto_form`).
AUTO_MIN_NARROW_SIZE_PER_RANK = 2
#: Extra sketch columns of the range finder (Halko et al.'s ``p``).
OVERSAMPLING = 10
#: Power iterations of the range finder (Halko et al.'s ``q``).
POWER_ITERATIONS = 2


def top_eigenpairs(matrix, rank, oversampling=OVERSAMPLING, power_iterations=POWER_ITERATIONS):
    """``(values [rank], vectors [d, rank])``: the top eigenpairs of a symmetric PSD ``matrix``, largest first.

    Randomized subspace iteration with a fixed sketch (the same ``Omega`` at
    every refresh of a factor, so a run is reproducible). The iteration is one
    graph function for every factor (:func:`keras_hoopt.linalg.shared_function`).
    """
    matrix = tf.convert_to_tensor(matrix)
    size = int(matrix.shape[0])
    width = min(size, rank + oversampling)
    sketch = tf.random.stateless_normal([size, width], seed=[size, rank], dtype=matrix.dtype)
    spec = tf.TensorSpec([None, None], matrix.dtype)
    iterate = linalg.shared_function(
        _subspace_iteration_with(power_iterations), [spec, spec, tf.TensorSpec([], tf.int32)]
    )
    values, vectors = iterate(matrix, sketch, tf.constant(rank, tf.int32))
    values.set_shape([rank])
    vectors.set_shape([size, rank])
    return values, vectors


def _subspace_iteration(matrix, sketch, rank, power_iterations):
    basis, _ = tf.linalg.qr(matrix @ sketch)
    for _ in range(power_iterations):
        basis, _ = tf.linalg.qr(matrix @ basis)
    projected = tf.matmul(basis, matrix @ basis, transpose_a=True)
    values, vectors = tf.linalg.eigh(0.5 * (projected + tf.transpose(projected)))
    values, vectors = tf.reverse(values, [0])[:rank], tf.reverse(vectors, [1])[:, :rank]
    return tf.maximum(values, 0.0), basis @ vectors


@functools.lru_cache(maxsize=None)
def _subspace_iteration_with(power_iterations):
    """One Python function (so one graph function) per number of power iterations."""

    def iterate(matrix, sketch, rank):
        return _subspace_iteration(matrix, sketch, rank, power_iterations)

    return iterate


def low_rank_inverse(matrix, rank, damping):
    """The low-rank form's state of ``(F~ + damping I)^-1`` for the factor ``matrix`` (module docstring)."""
    values, vectors = top_eigenpairs(matrix, rank)
    size = int(matrix.shape[0])
    tail = tf.maximum((tf.linalg.trace(matrix) - tf.reduce_sum(values)) / float(size - rank), 0.0)
    tail_inverse = 1.0 / (tail + damping)
    return {"basis": vectors, "weights": 1.0 / (values + damping) - tail_inverse, "tail_inverse": tail_inverse[None]}


def multiply_left(parts, matrix):
    """``(F~ + c I)^-1 @ matrix`` from a low-rank state."""
    basis = parts["basis"]
    return parts["tail_inverse"] * matrix + basis @ (parts["weights"][:, None] * tf.matmul(basis, matrix, transpose_a=True))


def multiply_right(matrix, parts):
    """``matrix @ (F~ + c I)^-1`` from a low-rank state."""
    basis = parts["basis"]
    return parts["tail_inverse"] * matrix + tf.matmul((matrix @ basis) * parts["weights"][None, :], basis, transpose_b=True)


def dense_inverse(parts):
    """The ``[d, d]`` matrix a low-rank state stands for (inspection and tests; the step never forms it)."""
    basis = parts["basis"]
    eye = tf.eye(int(basis.shape[0]), dtype=basis.dtype)
    return multiply_left(parts, eye)


class LowRankForm:
    """Mixin that gives a :class:`~keras_hoopt.blocks.base.KroneckerBlock` the low-rank form.

    Placed before the block type in the bases (:func:`with_low_rank`); the
    instance's ``rank`` is the optimizer's ``preconditioner_rank``, set there.
    """

    form = "low_rank"
    rank = None

    def is_low_rank(self, name):
        """Whether factor ``name`` takes the low-rank form (its size is at least ``MIN_SIZE_PER_RANK * rank``)."""
        return self.statistic_shapes()[name][0] >= MIN_SIZE_PER_RANK * self.rank

    def factor_form(self, name):
        return "low_rank" if self.is_low_rank(name) else "kronecker"

    def preconditioner_layout(self, name):
        if not self.is_low_rank(name):
            return super().preconditioner_layout(name)
        size = self.statistic_shapes()[name][0]
        return {
            "basis": ((size, self.rank), "zeros"),
            "weights": ((self.rank,), "zeros"),
            "tail_inverse": ((1,), "ones"),
        }

    def compute_preconditioner(self, name, statistics, damping, split_dim=None):
        if not self.is_low_rank(name):
            return super().compute_preconditioner(name, statistics, damping, split_dim)
        parts = low_rank_inverse(statistics[name], self.rank, self.factor_damping(name, statistics, damping))
        return parts, linalg.all_finite_together(list(parts.values()))

    def dense_inverse(self, name, parts):
        return dense_inverse(parts) if self.is_low_rank(name) else super().dense_inverse(name, parts)

    def apply_preconditioner(self, grads, state):
        return precondition_by_factors(self, grads, state, multiply_left, multiply_right, "basis")


def with_low_rank(block, rank, min_narrow_size=0):
    """``block`` in the low-rank form of ``rank`` (a new block of the same layer), or ``block`` itself
    where the form does not apply (not Kronecker-factored), no factor is wide enough for it (at least
    ``MIN_SIZE_PER_RANK * rank``) or its narrower factor is smaller than ``min_narrow_size``."""
    if not kronecker_factored(block) or isinstance(block, LowRankForm):
        return block
    sizes = [shape[0] for shape in block.statistic_shapes().values()]
    if max(sizes) < MIN_SIZE_PER_RANK * rank or min(sizes) < min_narrow_size:
        return block
    new = form_type(LowRankForm, type(block), "LowRank")(block.layer)
    new.label, new.rank = block.label, int(rank)
    return new


@register_form("low_rank")
def _low_rank_form(block, options):
    require_full_factors("low_rank", options)
    return with_low_rank(block, options.rank)


@register_form("auto")
def _auto_form(block, options):
    """The low-rank form on layers wide on both sides, the Kronecker form elsewhere.

    Preconditioning a ``d_in x d_out`` layer costs ``d_in d_out (d_in + d_out)``;
    the low-rank form saves ``d_out d_in (d_in - 2k)`` on a wide ``A``, which is
    small where ``d_out`` is small, while its approximation costs epochs all the
    same: on the MNIST CNN, whose only wide factor is the 1569-input
    classifier's ``A`` (10 outputs), ``"low_rank"`` took 33 epochs to Adam's
    best loss over three seeds against 25 (docs/benchmarks.md). So ``"auto"``
    takes it only on layers with a factor of at least ``MIN_SIZE_PER_RANK * k``
    (which takes the form) and the other at least ``AUTO_MIN_NARROW_SIZE_PER_RANK * k``
    (256 at the default rank: the deep autoencoder's 784/1000 layers and its
    1000 x 500 pair, the wide side low-rank), where the full form's cost is
    largest. With THOR's split inverses (``split_dim``) every block keeps them
    (:mod:`keras_hoopt.blocks.split`).
    """
    if options.split_dim is not None:
        return with_split(block, options.split_dim)
    return with_low_rank(block, options.rank, min_narrow_size=AUTO_MIN_NARROW_SIZE_PER_RANK * options.rank)
