"""Shared base of the unit-wise Fisher blocks of per-example normalisation layers.

LayerNormalization, RMSNormalization and GroupNormalization all end with an
element-wise affine map of a normalised input::

    y = gamma * xhat + beta

where ``xhat`` depends on the input only (its statistics are per example, not
per batch), and ``gamma``/``beta`` are broadcast over the *location* axes of
the input (every non-batch axis the parameters do not span). With ``delta =
dl_n / dy`` the per-example gradient of the loss at the layer output, the
per-example parameter gradients of unit (feature or channel) ``c`` are::

    g_gamma[n, c] = sum_{locations} xhat[n, ..., c, ...] * delta[n, ..., c, ...]
    g_beta[n, c]  = sum_{locations} delta[n, ..., c, ...]

and the unit-wise Fisher of Osawa et al. (SP-NGD) keeps, per unit, the 2x2
(1x1 with only one of gamma/beta) block::

    F_c = E_n[v_{n,c} v_{n,c}^T],   v_{n,c} = (g_gamma[n, c], g_beta[n, c])

damped by ``damping * I`` and inverted in closed form. Because nothing
follows the affine map inside the layer, tapping the layer output gives
exactly ``delta``.

Reference:
    Osawa et al., "Scalable and Practical Natural Gradient for Large-Scale
    Deep Learning", TPAMI 2020 (arXiv:2002.06015), section on BatchNorm's
    unit-wise Fisher (here applied to per-example normalisations).
"""

import math

import keras
import tensorflow as tf

from keras_hoopt import linalg
from keras_hoopt.blocks.base import CurvatureBlock


class UnitwiseNormalizationBlock(CurvatureBlock):
    """Unit-wise (2x2 per unit) Fisher of a per-example normalisation layer.

    Conventions: the per-example output gradients ``delta`` are those of
    ``output_grads()`` (already scaled by the batch size, so they are the
    gradients of each example's own loss); ``F = (1/B) sum_n v v^T``. The
    unit index ``c`` is the row-major flat index of the parameter variables,
    so that ``F[c]`` preconditions ``gamma.reshape(-1)[c]`` and
    ``beta.reshape(-1)[c]``. A layer called several times in a step sums the
    per-example gradients of its calls (the parameters are shared).

    Subclasses define :meth:`_scale_variable`, :meth:`_offset_variable`,
    :meth:`_normalized` (``xhat`` of one call, float32, the input's shape) and
    :meth:`_parameter_axes` (the input axes the parameters span).
    """

    # -- layer-type hooks ---------------------------------------------------
    @staticmethod
    def _scale_variable(layer):
        """The multiplicative parameter (gamma), or ``None``."""
        raise NotImplementedError

    @staticmethod
    def _offset_variable(layer):
        """The additive parameter (beta), or ``None``."""
        raise NotImplementedError

    def _normalized(self, call):
        """``xhat`` (float32, shape of ``call.inputs``) as the layer computes it."""
        raise NotImplementedError

    def _parameter_axes(self, rank):
        """Ascending input axes spanned by the parameters.

        The row-major flattening of these axes must be the flat layout of the
        parameter variables (how the layer broadcasts them onto the input).
        """
        raise NotImplementedError

    @classmethod
    def layer_variables(cls, layer):
        scale, offset = cls._scale_variable(layer), cls._offset_variable(layer)
        return [v for v in (scale, offset) if v is not None]

    @classmethod
    def capture_call(cls, layer, original_call, record, inputs, *args, **kwargs):
        # The layer's own call, unchanged: its output is gamma * xhat + beta
        # (then at most a dtype cast or reshape), so its gradient is delta.
        outputs = original_call(inputs, *args, **kwargs)
        record.inputs = inputs
        return record.tap(outputs)

    # -- statistics ----------------------------------------------------------
    @property
    def has_scale(self):
        return self._scale_variable(self.layer) is not None

    @property
    def has_offset(self):
        return self._offset_variable(self.layer) is not None

    @property
    def units(self):
        """Number of units ``c`` (elements of each parameter variable)."""
        return math.prod(int(d) for d in self.variables[0].shape)

    def statistic_shapes(self):
        k = len(self.variables)
        return {"F": (self.units, k, k)}

    def _unit_gradients(self, call, grad):
        """``[batch, units, k]`` per-example gradients of (gamma, beta)."""
        grad = tf.cast(grad, tf.float32)
        rank = grad.shape.rank
        parameter_axes = self._parameter_axes(rank)
        location_axes = [i for i in range(1, rank) if i not in parameter_axes]

        def per_unit(x):
            if location_axes:
                x = tf.reduce_sum(x, axis=location_axes)
            return tf.reshape(x, (-1, self.units))

        parts = []
        if self.has_scale:
            parts.append(per_unit(self._normalized(call) * grad))
        if self.has_offset:
            parts.append(per_unit(grad))
        return tf.stack(parts, axis=-1)

    def compute_statistic(self, name, calls, output_grads):
        vectors = tf.add_n([self._unit_gradients(c, g) for c, g in zip(calls, output_grads())])
        examples = tf.cast(tf.shape(vectors)[0], tf.float32)
        return tf.einsum("nci,ncj->cij", vectors, vectors) / examples

    def compute_inverse(self, name, statistics, damping, split_dim=None):
        # Already block-diagonal (one k x k block per unit): split_dim is moot.
        return linalg.damped_inverse(statistics[name], tf.cast(damping, tf.float32))

    def damped_fisher_trace(self, statistics, damping):
        size = float(self.units * len(self.variables))
        return tf.reduce_sum(tf.linalg.trace(statistics["F"])) + damping * size

    def precondition(self, grads, inverses):
        stacked = tf.stack([tf.reshape(tf.cast(g, tf.float32), (-1,)) for g in grads], axis=-1)
        out = tf.einsum("cij,cj->ci", inverses["F"], stacked)
        return [tf.reshape(out[:, i], v.shape) for i, v in enumerate(self.variables)]


def _positive_axes(axis, rank):
    """Sorted non-negative axes of an int or a list of ints."""
    axes = [axis] if isinstance(axis, int) else list(axis)
    return sorted({a % rank for a in axes})


def _epsilon(layer):
    """The layer's epsilon, or Keras's default where the op would use it (``None``)."""
    return keras.config.epsilon() if layer.epsilon is None else layer.epsilon
