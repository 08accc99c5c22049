"""Curvature blocks: one per supported layer type, one file each.

A block knows three things about its layer type:

* how to run the layer's forward pass while recording what its curvature needs
  (:meth:`CurvatureBlock.capture_call`, used by :mod:`keras_hoopt.capture`);
* how to turn one step's recorded inputs and per-example output gradients into
  statistics (:meth:`CurvatureBlock.compute_statistics`);
* how to damp and invert those statistics and precondition the layer's
  gradients (:meth:`CurvatureBlock.compute_inverses`, :meth:`CurvatureBlock.precondition`).

Blocks hold no TensorFlow state: the optimizer owns every variable (so that
``.keras`` files and checkpoints see it) and passes values in.

Adding a layer type means writing a subclass in its own module and decorating
it with :func:`keras_hoopt.blocks.register_block`.
"""

import tensorflow as tf

from keras_hoopt import linalg


class CurvatureBlock:
    """Base class of a per-layer curvature block.

    Attributes:
        kind: short name reported by ``curvature_summary()`` (``"dense"``...).
        layer: the Keras layer.
        variables: the layer's trainable variables this block preconditions,
            in the order in which :meth:`precondition` takes their gradients.
    """

    kind = None
    #: The preconditioner form (:mod:`keras_hoopt.blocks.forms`); a form's mixin overrides it.
    form = "kronecker"

    def __init__(self, layer):
        self.layer = layer
        self.variables = self.layer_variables(layer)
        # Prefix of the optimizer variables of this block: the layer name, or
        # (set by the optimizer) its path where several blocks share a name,
        # as the "query"/"key"/... projections of every attention layer do.
        self.label = layer.name

    # -- layer-type hooks ---------------------------------------------------
    @classmethod
    def matches(cls, layer):
        """Whether this block type handles ``layer`` exactly."""
        raise NotImplementedError

    @staticmethod
    def layer_variables(layer):
        raise NotImplementedError

    @classmethod
    def capture_call(cls, layer, original_call, record, *args, **kwargs):
        """Run ``layer``'s forward pass, recording into ``record`` (a LayerCall)."""
        raise NotImplementedError

    def statistic_shapes(self):
        """``{name: shape}`` of the statistics (factors) this block keeps."""
        raise NotImplementedError

    def compute_statistic(self, name, calls, output_grads):
        """This batch's estimate (float32) of statistic ``name``.

        Args:
            name: one of :meth:`statistic_shapes`.
            calls: the ``LayerCall`` records of this step (several for a layer
                called more than once).
            output_grads: a callable returning the per-example output gradients
                ``g`` (float32), one per call. It is only called by statistics
                that need them, so a statistic that is not due costs nothing
                (in particular no Monte-Carlo backward pass). A block that taps
                more than the output (``LayerCall.tap(x, name)``) passes the
                tap's name: ``output_grads(name)``.

        A statistic of shape ``(n,)`` is a diagonal (kept as its diagonal;
        initialised to ones, like the identity of a square statistic).
        """
        raise NotImplementedError

    def needs_output_grads(self, name):
        """Whether statistic ``name`` calls ``output_grads`` (True unless a block says otherwise).

        With the Monte-Carlo Fisher the optimizer runs the sampled backward
        pass in steps where a statistic that needs it is due; a block whose
        input-side statistics need only the layer inputs says so here, so that
        a step refreshing only those runs no backward pass.
        """
        return True

    @staticmethod
    def forward_state_before(calls):
        """``[(variable, value before this step)]`` of layer state the training pass wrote.

        BatchNormalization updates its moving mean and variance in the forward
        pass; its ``capture_call`` snapshots them first (``extras["state_before"]``)
        so that the optimizer can put them back when it skips a non-finite
        step. Layers without such state return ``[]``.
        """
        return calls[0].extras.get("state_before", []) if calls else []

    def compute_statistics(self, calls, output_grads):
        """Every statistic of this batch: ``{name: tensor}``."""
        return {name: self.compute_statistic(name, calls, output_grads) for name in self.statistic_shapes()}

    def compute_inverse(self, name, statistics, damping, split_dim=None):
        """Damped inverse ``(inverse, ok)`` of statistic ``name``.

        ``statistics`` holds every statistic of the block (a factor's damping
        may depend on the others, e.g. K-FAC's pi); only ``name`` is inverted,
        so a refresh policy can re-invert just the factors that changed.
        ``split_dim``: invert only the diagonal blocks of that size (THOR).
        """
        raise NotImplementedError

    def compute_inverses(self, statistics, damping, split_dim=None):
        """Damped inverses ``{name: (inverse, ok)}`` of every statistic."""
        return {name: self.compute_inverse(name, statistics, damping, split_dim) for name in self.statistic_shapes()}

    # -- preconditioner state: the block's own layout ------------------------
    def preconditioner_layout(self, name):
        """``{part: (shape, initializer)}`` of the state kept for statistic ``name``.

        The optimizer creates one variable per part (named
        ``<layer>_<statistic>_<part>``, initializer ``"identity"``, ``"zeros"``
        or ``"ones"``), refreshes it with :meth:`compute_preconditioner` when
        the refresh policy says so, shares it between workers and hands it to
        :meth:`apply_preconditioner`. The default is one damped inverse per
        statistic; another form (a Cholesky factor, an eigenbasis and its
        eigenvalues, low-rank factors) overrides these three methods.
        """
        return {"inverse": (self.statistic_shapes()[name], "identity")}

    def compute_preconditioner(self, name, statistics, damping, split_dim=None):
        """``({part: tensor}, ok)``: fresh preconditioner state of statistic ``name``."""
        inverse, ok = self.compute_inverse(name, statistics, damping, split_dim)
        return {"inverse": inverse}, ok

    def apply_preconditioner(self, grads, state):
        """Preconditioned gradients from ``state = {statistic: {part: tensor}}``."""
        return self.precondition(grads, {name: parts["inverse"] for name, parts in state.items()})

    def factor_form(self, name):
        """The form statistic ``name``'s preconditioner state takes (a form may choose per factor)."""
        return self.form

    def dense_inverse(self, name, parts):
        """The damped inverse of statistic ``name`` that its preconditioner state ``parts`` stands for
        (a tensor; inspection and tests, the step never forms it), or None where the form keeps none."""
        return parts.get("inverse")

    # -- running state: block state folded every step its statistics are due --
    def running_layout(self):
        """``{part: (shape, initializer)}`` of block state that follows the batch between refreshes.

        Empty for the default form. A form whose preconditioner mixes a
        refreshed part with a per-batch estimate (EKFAC's diagonal in the
        eigenbasis, :mod:`keras_hoopt.blocks.eigenbasis`) declares it here;
        the optimizer then runs :meth:`running_batch_value` and
        :meth:`fold_running` in the step's ``running_state`` stage.
        """
        return {}

    def damped_fisher_trace(self, statistics, damping):
        """``tr(F + damping * I)`` of the block's Fisher approximation."""
        raise NotImplementedError

    def precondition(self, grads, inverses):
        """Preconditioned gradients from the damped inverses ``{statistic: inverse}``, aligned with
        ``self.variables`` (the default preconditioner form)."""
        raise NotImplementedError

    @property
    def name(self):
        return self.layer.name


class KroneckerBlock(CurvatureBlock):
    """A layer ``s = W a`` whose Fisher block is approximated by ``A (x) G``.

    Rows: each example ``n`` contributes ``|T|`` rows (locations) ``a_{n,t}``
    (layer input, with a trailing 1 when the layer has a bias) and ``g_{n,t}``
    (per-example gradient of the loss w.r.t. the pre-activation output).

    Factors (Grosse & Martens' Omega and Gamma)::

        A = E_n[ sum_t a_{n,t} a_{n,t}^T ]        (d_in x d_in)
        G = E_n[ (1/|T|) sum_t g_{n,t} g_{n,t}^T ] (d_out x d_out)

    so the Fisher block of the layer is ``A (x) G`` (for Dense, ``|T| = 1``:
    ``A = E[a a^T]``, ``G = E[g g^T]``). With the Keras kernel laid out as
    ``(d_in, d_out)`` and the bias appended as a last row, the preconditioned
    gradient is ``(A + pi sqrt(l) I)^-1 dW (G + sqrt(l)/pi I)^-1`` (factored
    Tikhonov damping, ``pi = sqrt((tr A / d_in) / (tr G / d_out))``).
    """

    @staticmethod
    def layer_variables(layer):
        return [layer.kernel] + ([layer.bias] if layer.bias is not None else [])

    def input_rows(self, call):
        """``[rows, d_in]`` layer inputs (float32, bias column appended)."""
        raise NotImplementedError

    def output_rows(self, grad):
        """``[rows, d_out]`` per-example output gradients."""
        raise NotImplementedError

    @property
    def has_bias(self):
        return len(self.variables) == 2

    @property
    def input_dim(self):
        kernel = self.variables[0]
        return _prod(kernel.shape[:-1]) + int(self.has_bias)

    @property
    def output_dim(self):
        return int(self.variables[0].shape[-1])

    def statistic_shapes(self):
        return {"A": (self.input_dim, self.input_dim), "G": (self.output_dim, self.output_dim)}

    def needs_output_grads(self, name):
        return name != "A"

    def _append_bias_column(self, rows):
        if not self.has_bias:
            return rows
        return tf.concat([rows, tf.ones_like(rows[:, :1])], axis=1)

    def compute_statistic(self, name, calls, output_grads):
        if name == "A":
            a = tf.concat([self.input_rows(c) for c in calls], axis=0)
            examples = tf.cast(tf.shape(calls[0].inputs)[0], tf.float32)
            return tf.matmul(a, a, transpose_a=True) / examples
        g = tf.concat([self.output_rows(grad) for grad in output_grads()], axis=0)
        return tf.matmul(g, g, transpose_a=True) / tf.cast(tf.shape(g)[0], tf.float32)

    def factor_damping(self, name, statistics, damping):
        """Factor ``name``'s share of the damping: ``pi sqrt(l)`` for ``A``, ``sqrt(l) / pi`` for ``G``.

        pi needs only the two traces: re-inverting one factor leaves the
        other's inverse damped with the pi of its own last inversion.
        """
        pi = linalg.pi_damping(statistics["A"], statistics["G"])
        root = tf.sqrt(tf.cast(damping, tf.float32))
        return pi * root if name == "A" else root / pi

    def compute_inverse(self, name, statistics, damping, split_dim=None):
        size = statistics[name].shape[-1]
        if (split_dim is not None and size > split_dim) or size is None or size <= 2:
            # THOR's split (static block sizes) and the closed-form 2 x 2 stay inline.
            return linalg.block_diagonal_damped_inverse(
                statistics[name], self.factor_damping(name, statistics, damping), split_dim
            )
        return linalg.kronecker_factor_inverse(name, statistics["A"], statistics["G"], damping)

    def damped_fisher_trace(self, statistics, damping):
        # tr(A (x) G + l I) = tr A * tr G + l * dim A * dim G
        size = float(self.input_dim * self.output_dim)
        return tf.linalg.trace(statistics["A"]) * tf.linalg.trace(statistics["G"]) + damping * size

    def gradient_matrix(self, grads):
        """``[d_in (+1), d_out]`` matrix of the kernel gradient (and bias row)."""
        matrix = tf.reshape(tf.cast(grads[0], tf.float32), (-1, self.output_dim))
        if self.has_bias:
            matrix = tf.concat([matrix, tf.cast(grads[1], tf.float32)[None, :]], axis=0)
        return matrix

    def gradients_from_matrix(self, matrix):
        """The inverse of :meth:`gradient_matrix`: a ``[d_in (+1), d_out]`` matrix as per-variable tensors."""
        kernel = self.variables[0]
        if self.has_bias:
            return [tf.reshape(matrix[:-1], kernel.shape), matrix[-1]]
        return [tf.reshape(matrix, kernel.shape)]

    def precondition(self, grads, inverses):
        return self.gradients_from_matrix(inverses["A"] @ self.gradient_matrix(grads) @ inverses["G"])


def _prod(values):
    out = 1
    for v in values:
        out *= int(v)
    return out
