"""Curvature block for ``keras.layers.SimpleRNN`` (KFAC-expand over time steps)."""

import keras
from keras import ops

from keras_hoopt.blocks.registry import register_block
from keras_hoopt.blocks.rnn import KroneckerPiece, RecurrentBlock


@register_block
class SimpleRNNBlock(RecurrentBlock):
    """K-FAC block of a SimpleRNN layer (or ``keras.layers.RNN(SimpleRNNCell)``).

    ``h_t = act(z_t)``, ``z_t = x_t W + b + h_{t-1} U``. Statistics (see
    :mod:`keras_hoopt.blocks.rnn` for the conventions)::

        A_kernel    = (1/N) sum_{n,t} [x_t; 1][x_t; 1]^T   (x_t after input dropout)
        A_recurrent = (1/N) sum_{n,t} h_{t-1} h_{t-1}^T     (h_{t-1} after recurrent dropout)
        G           = mean_{n,t} g_t g_t^T,  g_t = dl_n / dz_t

    ``F_kernel ~ A_kernel (x) G`` (bias as the last row of the kernel) and
    ``F_recurrent ~ A_recurrent (x) G``; ``G`` keeps one damped inverse per
    kernel (parts ``"kernel"`` and ``"recurrent"``). Input and recurrent
    dropout are supported (one mask per sequence, as Keras draws them).
    """

    kind = "simple_rnn"
    layer_class = keras.layers.SimpleRNN
    cell_class = keras.layers.SimpleRNNCell
    gates = 1

    @classmethod
    def _cell_step(cls, cell, projected, states, recurrent_mask):
        h_prev = states[0]
        if recurrent_mask is not None:
            h_prev = h_prev * recurrent_mask
        output = projected + ops.matmul(h_prev, cell.recurrent_kernel)
        if cell.activation is not None:
            output = cell.activation(output)
        return output, [output], [("recurrent_inputs", h_prev)]

    def _pieces(self, cell):
        size = self.gates * cell.units
        return [
            KroneckerPiece("kernel", "A_kernel", "G", 0, (0, size), "vector" if cell.use_bias else None),
            KroneckerPiece("recurrent", "A_recurrent", "G", 1, (0, size), None),
        ]

    def _a_source(self, name):
        return "inputs" if name == "A_kernel" else "recurrent_inputs"
