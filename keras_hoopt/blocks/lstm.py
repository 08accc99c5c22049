"""Curvature block for ``keras.layers.LSTM`` (KFAC-expand over time steps)."""

import keras
from keras import ops

from keras_hoopt.blocks.registry import register_block
from keras_hoopt.blocks.rnn import KroneckerPiece, RecurrentBlock


@register_block
class LSTMBlock(RecurrentBlock):
    """K-FAC block of an LSTM layer (or ``keras.layers.RNN(LSTMCell)``).

    The four gates' pre-activations (Keras order ``i, f, c, o``)
    ``z_t = x_t W + b + h_{t-1} U`` are linear in both kernels, so both
    share ``G``. Statistics (see :mod:`keras_hoopt.blocks.rnn`)::

        A_kernel    = (1/N) sum_{n,t} [x_t; 1][x_t; 1]^T   (d_in + 1)
        A_recurrent = (1/N) sum_{n,t} h_{t-1} h_{t-1}^T     (units)
        G           = mean_{n,t} g_t g_t^T                  (4 units), g_t = dl_n / dz_t

    ``F_kernel ~ A_kernel (x) G``, ``F_recurrent ~ A_recurrent (x) G``.
    Input dropout is supported with ``implementation=2`` (Keras's default:
    one mask for all gates); recurrent dropout (which makes Keras use one
    mask per gate) is rejected.
    """

    kind = "lstm"
    layer_class = keras.layers.LSTM
    cell_class = keras.layers.LSTMCell
    gates = 4
    cell_methods = ("call", "_compute_carry_and_output", "_compute_carry_and_output_fused")

    @classmethod
    def _dropout_supported(cls, cell):
        return cell.recurrent_dropout == 0 and (cell.dropout == 0 or cell.implementation != 1)

    @classmethod
    def _cell_step(cls, cell, projected, states, recurrent_mask):
        h_prev, c_prev = states[0], states[1]
        z = ops.add(projected, ops.matmul(h_prev, cell.recurrent_kernel))
        c, o = cell._compute_carry_and_output_fused(ops.split(z, 4, axis=1), c_prev)
        h = o * cell.activation(c)
        return h, [h, c], [("recurrent_inputs", h_prev)]

    def _pieces(self, cell):
        size = self.gates * cell.units
        return [
            KroneckerPiece("kernel", "A_kernel", "G", 0, (0, size), "vector" if cell.use_bias else None),
            KroneckerPiece("recurrent", "A_recurrent", "G", 1, (0, size), None),
        ]

    def _a_source(self, name):
        return "inputs" if name == "A_kernel" else "recurrent_inputs"
