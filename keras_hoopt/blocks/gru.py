"""Curvature block for ``keras.layers.GRU`` (KFAC-expand over time steps)."""

import keras
import tensorflow as tf
from keras import ops

from keras_hoopt.blocks.registry import register_block
from keras_hoopt.blocks.rnn import KroneckerPiece, RecurrentBlock


@register_block
class GRUBlock(RecurrentBlock):
    """K-FAC block of a GRU layer (or ``keras.layers.RNN(GRUCell)``), both ``reset_after`` variants.

    With ``Z_in = x_t W + b_in`` (gates in Keras order ``z, r, h``; ``s`` the
    gate nonlinearity), ``g = dl_n / dZ_in`` (the gradient of the three
    pre-activations, :mod:`keras_hoopt.blocks.rnn`) and ``m`` the mask:

    ``reset_after=True`` (Keras's default, bias ``[2, 3 units]``)::

        R_t = h_{t-1} U + b_rec
        z = s(Zin_z + R_z),  r = s(Zin_r + R_r),  hh = act(Zin_h + r * R_h)

      ``U`` multiplies ``h_{t-1}`` in all three blocks, but ``R_h`` reaches
      the loss through the reset gate: ``dl/dR_t = g_t * [1, 1, r_t]``. So::

        A_kernel    = (1/N) sum [x_t; 1][x_t; 1]^T        G_kernel    = mean g_t g_t^T
        A_recurrent = (1/N) sum [h_{t-1}; 1][h_{t-1}; 1]^T G_recurrent = mean d_t d_t^T,
                                                            d_t = g_t * [1, 1, r_t]

      with bias row 0 (input bias) folded into the kernel and row 1
      (recurrent bias) into the recurrent kernel.

    ``reset_after=False`` (bias ``[3 units]``)::

        z = s(Zin_z + h_{t-1} U_z),  r = s(Zin_r + h_{t-1} U_r),
        hh = act(Zin_h + (r * h_{t-1}) U_h)

      the gate columns ``U_zr`` of the recurrent kernel multiply ``h_{t-1}``
      and the candidate columns ``U_h`` multiply ``r * h_{t-1}``, both with
      the same output gradient ``g``. ``U`` is split into these two pieces::

        A_kernel              = (1/N) sum [x_t; 1][x_t; 1]^T   (x) G
        A_recurrent           = (1/N) sum h h^T                 (x) G[:2u, :2u]
        A_recurrent_candidate = (1/N) sum (r h)(r h)^T          (x) G[2u:, 2u:]

      ``G = mean g g^T`` is one statistic with one damped inverse per piece.

    Input dropout is supported with ``implementation=2`` (one mask for all
    gates); recurrent dropout (one mask per gate in Keras) is rejected.
    """

    kind = "gru"
    layer_class = keras.layers.GRU
    cell_class = keras.layers.GRUCell
    gates = 3

    @classmethod
    def _dropout_supported(cls, cell):
        return cell.recurrent_dropout == 0 and (cell.dropout == 0 or cell.implementation != 1)

    @classmethod
    def _input_bias(cls, cell):
        if cell.bias is None:
            return None
        return cell.bias[0] if cell.reset_after else cell.bias

    @classmethod
    def _cell_step(cls, cell, projected, states, recurrent_mask):
        h_prev = states[0]
        units = cell.units
        x_z, x_r, x_h = ops.split(projected, 3, axis=-1)
        if cell.reset_after:
            inner = ops.matmul(h_prev, cell.recurrent_kernel)
            if cell.bias is not None:
                inner = inner + cell.bias[1]
        else:
            inner = ops.matmul(h_prev, cell.recurrent_kernel[:, : 2 * units])
        z = cell.recurrent_activation(x_z + inner[:, :units])
        r = cell.recurrent_activation(x_r + inner[:, units : 2 * units])
        if cell.reset_after:
            recurrent_h = r * inner[:, 2 * units :]
            recorded = [("recurrent_inputs", h_prev), ("reset_gate", r)]
        else:
            reset_state = r * h_prev
            recurrent_h = ops.matmul(reset_state, cell.recurrent_kernel[:, 2 * units :])
            recorded = [("recurrent_inputs", h_prev), ("reset_recurrent_inputs", reset_state)]
        hh = cell.activation(x_h + recurrent_h)
        h = z * h_prev + (1 - z) * hh
        return h, [h], recorded

    def _pieces(self, cell):
        u = cell.units
        if cell.reset_after:
            bias = cell.use_bias
            return [
                KroneckerPiece("kernel", "A_kernel", "G_kernel", 0, (0, 3 * u), 0 if bias else None),
                KroneckerPiece("recurrent", "A_recurrent", "G_recurrent", 1, (0, 3 * u), 1 if bias else None),
            ]
        return [
            KroneckerPiece("kernel", "A_kernel", "G", 0, (0, 3 * u), "vector" if cell.use_bias else None),
            KroneckerPiece("recurrent_gates", "A_recurrent", "G", 1, (0, 2 * u), None),
            KroneckerPiece("recurrent_candidate", "A_recurrent_candidate", "G", 1, (2 * u, 3 * u), None),
        ]

    def _a_source(self, name):
        return {
            "A_kernel": "inputs",
            "A_recurrent": "recurrent_inputs",
            "A_recurrent_candidate": "reset_recurrent_inputs",
        }[name]

    def _output_locations(self, name, call, grad):
        if name != "G_recurrent":
            return grad
        reset = tf.cast(call.extras["reset_gate"], tf.float32)
        return grad * tf.concat([tf.ones_like(reset), tf.ones_like(reset), reset], axis=-1)
