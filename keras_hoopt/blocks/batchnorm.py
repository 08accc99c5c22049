"""Curvature block for ``keras.layers.BatchNormalization`` (unit-wise Fisher)."""

import keras
import tensorflow as tf

from keras_hoopt import linalg
from keras_hoopt.blocks.base import CurvatureBlock
from keras_hoopt.blocks.registry import register_block


@register_block
class BatchNormBlock(CurvatureBlock):
    """Unit-wise Fisher of a BatchNormalization layer (Osawa et al., SP-NGD).

    For every channel ``c`` and example ``n``, with ``xhat`` the normalised
    input and ``delta`` the per-example gradient of the loss w.r.t. the layer
    output::

        g_gamma = sum_{spatial} xhat * delta,   g_beta = sum_{spatial} delta
        F_c = E_n [[g_gamma^2, g_gamma g_beta], [g_gamma g_beta, g_beta^2]]

    one 2x2 block per channel (1x1 when the layer has only ``scale`` or only
    ``center``), damped by ``damping * I`` and inverted in closed form.
    """

    kind = "batchnorm"

    @classmethod
    def matches(cls, layer):
        return (
            isinstance(layer, keras.layers.BatchNormalization)
            and type(layer).call is keras.layers.BatchNormalization.call
            and not layer.renorm
            and isinstance(layer.axis, int)
            and (layer.scale or layer.center)
        )

    @staticmethod
    def layer_variables(layer):
        return ([layer.gamma] if layer.scale else []) + ([layer.beta] if layer.center else [])

    @classmethod
    def capture_call(cls, layer, original_call, record, inputs, training=None, mask=None):
        record.extras = {"training": training, "mask": mask}
        if training and layer.trainable:
            # Read before the call updates them: restored if the step is skipped (non-finite).
            record.extras["state_before"] = [
                (v, tf.identity(tf.convert_to_tensor(v))) for v in (layer.moving_mean, layer.moving_variance)
            ]
        outputs = original_call(inputs, training=training, mask=mask)
        record.inputs = inputs
        if training and layer.trainable and getattr(layer, "synchronized", False):
            # Synchronized BatchNorm all-reduces its moments across replicas. The
            # statistic is computed inside the optimizer's tf.cond (only when due),
            # where no cross-replica call may sit: take the moments here, in the
            # forward pass, where they are legal (and equal to the ones it used).
            record.extras["moments"] = layer._moments(tf.cast(inputs, tf.float32), mask)
        return record.tap(outputs)

    @property
    def channels(self):
        return int(self.variables[0].shape[0])

    def statistic_shapes(self):
        k = len(self.variables)
        return {"F": (self.channels, k, k)}

    def _unit_gradients(self, call, grad):
        """``[batch, C, k]`` per-example gradients of (gamma, beta)."""
        layer = self.layer
        x = tf.cast(call.inputs, tf.float32)
        rank = x.shape.rank
        axis = layer.axis % rank
        training = call.extras.get("training")
        if "moments" in call.extras:
            mean, variance = call.extras["moments"]
        elif training and layer.trainable:
            mean, variance = layer._moments(x, call.extras.get("mask"))
        else:
            mean, variance = layer.moving_mean, layer.moving_variance
        shape = [1] * rank
        shape[axis] = self.channels
        mean = tf.reshape(tf.cast(mean, tf.float32), shape)
        variance = tf.reshape(tf.cast(variance, tf.float32), shape)
        xhat = (x - mean) * tf.math.rsqrt(variance + layer.epsilon)
        reduce_axes = [i for i in range(1, rank) if i != axis]
        parts = []
        if layer.scale:
            parts.append(tf.reduce_sum(xhat * grad, axis=reduce_axes))
        if layer.center:
            parts.append(tf.reduce_sum(grad, axis=reduce_axes))
        return tf.stack(parts, axis=-1)

    def compute_statistic(self, name, calls, output_grads):
        vectors = tf.add_n([self._unit_gradients(c, g) for c, g in zip(calls, output_grads())])
        examples = tf.cast(tf.shape(vectors)[0], tf.float32)
        return tf.einsum("nci,ncj->cij", vectors, vectors) / examples

    def compute_inverse(self, name, statistics, damping, split_dim=None):
        # Already block-diagonal (one 2x2 block per channel): split_dim is moot.
        return linalg.damped_inverse(statistics[name], tf.cast(damping, tf.float32))

    def damped_fisher_trace(self, statistics, damping):
        size = float(self.channels * len(self.variables))
        return tf.reduce_sum(tf.linalg.trace(statistics["F"])) + damping * size

    def precondition(self, grads, inverses):
        stacked = tf.stack([tf.cast(g, tf.float32) for g in grads], axis=-1)
        out = tf.einsum("cij,cj->ci", inverses["F"], stacked)
        return [out[:, i] for i in range(len(grads))]
