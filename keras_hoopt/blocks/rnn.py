"""Shared base of the curvature blocks of Keras's recurrent layers (SimpleRNN, LSTM, GRU).

A recurrent layer with ``k`` gates of ``units`` each has an input kernel
``W [d_in, k*units]``, a recurrent kernel ``U [units, k*units]`` and a bias.
At every time step ``t`` of example ``n`` it forms pre-activations::

    z_{n,t} = x_{n,t} W + b + h_{n,t-1} U          (SimpleRNN, LSTM)

(GRU: see :mod:`keras_hoopt.blocks.gru`, where part of ``h U`` is gated by
the reset gate), so each kernel is a layer applied at ``T`` locations (the
time steps) with its own input and the same output gradient
``g_{n,t} = dl_n / dz_{n,t}``. Following the "independent time steps"
approximation of Martens, Ba & Johnson (2018) in its KFAC-expand form
(Eschenhagen et al. 2023: time steps are treated like extra examples), every
kernel gets a Kronecker-factored Fisher block with this package's
conventions (:class:`~keras_hoopt.blocks.base.KroneckerBlock`)::

    A_W = (1/N) sum_{n,t} m_{n,t} [x_{n,t}; 1][x_{n,t}; 1]^T
    A_U = (1/N) sum_{n,t} m_{n,t} h_{n,t-1} h_{n,t-1}^T
    G   = sum_{n,t} m_{n,t} g_{n,t} g_{n,t}^T / sum_{n,t} m_{n,t}

``F_W ~ A_W (x) G`` and ``F_U ~ A_U (x) G``: the sums over time sit in ``A``
and the mean over time in ``G``, as for a convolution's locations. ``m`` is
the Keras mask (1 everywhere without one): a masked step leaves the state
unchanged, so its ``g`` is 0 and it is excluded from both factors (a batch
of equal-length masked sequences has the factors of the unpadded batch).
``h_{n,t-1}`` is the state the step actually multiplies by ``U`` (the
initial state for the first processed step; after recurrent dropout for
SimpleRNN). The two kernels are preconditioned separately (the Fisher
blocks between ``W`` and ``U`` are dropped), each with factored Tikhonov
damping ``pi`` computed from its own pair of factors: where ``W`` and ``U``
share one ``G`` statistic, it keeps one damped inverse per kernel.

Capture: a custom-gradient tap inside the recurrence's ``tf.while_loop``
cannot hand its gradient out of the loop. The block therefore computes the
input projection of all time steps before the loop, ``Z_in = X W + b``
(``[B, T, k*units]``), taps it (it enters ``z_t`` linearly, so
``dZ_in[:, t] = g_t`` exactly), and runs the recurrence itself with Keras's
own loop (``keras.src.backend.rnn``: the same masking, ``go_backwards``,
``unroll`` and ``zero_output_for_mask`` semantics as the layer) on a step
function that consumes ``Z_in`` instead of multiplying ``W``. The step also
emits the state it multiplies by ``U`` (and, for GRU, the reset gate), which
are stacked over time and recorded in ``record.extras``. The result equals
the layer's own output (up to float rounding: the additions are ordered
differently) and has its dtype.

What the blocks reject (the layer then gets the first-order fallback):
``stateful=True``; dropout rates outside ``[0, 1)``; recurrent dropout for
LSTM and GRU (Keras then switches to ``implementation=1``, which draws one
mask per gate, so each gate's kernel columns see a different input and one
``A`` per kernel no longer describes them), and input dropout together with
``implementation=1``; subclasses that override ``call`` or ``inner_loop``,
and cells other than the layer type's own (or subclasses overriding the
cell's step). ``keras.layers.RNN`` wrapping a single supported cell is
handled like the dedicated layer.

On a GPU where Keras would use cuDNN for LSTM/GRU, the training pass runs
this generic recurrence instead (inference still uses cuDNN); for masked
inputs Keras's two paths differ (cuDNN requires right-padded masks and
zeroes the padded outputs), and the generic path is the one reproduced.

References:
    Martens, Ba & Johnson, "Kronecker-factored curvature approximations for
    recurrent neural networks", ICLR 2018 (option "independent time steps").
    Eschenhagen et al., "Kronecker-Factored Approximate Curvature for Modern
    Neural Network Architectures", NeurIPS 2023 (KFAC-expand).
"""

import collections

import keras
import tensorflow as tf
from keras import ops
from keras.src import backend as keras_backend
from keras.src import tree

from keras_hoopt import linalg
from keras_hoopt.blocks.base import CurvatureBlock

KroneckerPiece = collections.namedtuple("KroneckerPiece", "name a g variable columns bias")
KroneckerPiece.__doc__ = """One Kronecker-factored part of a recurrent layer's parameters.

Fields:
    name: the piece's name (``"kernel"``, ``"recurrent"``...).
    a, g: names of its input-side and output-side statistics.
    variable: index in ``block.variables`` of the kernel it preconditions
        (0: input kernel, 1: recurrent kernel).
    columns: ``(start, stop)`` of the kernel's columns it covers; also the
        rows and columns of the ``g`` statistic it uses.
    bias: ``None`` (no bias row), ``"vector"`` (the bias ``b[start:stop]`` is
        folded in as a last row) or an int ``r`` (row ``b[r, start:stop]`` of
        GRU's two-row bias).
"""


class RecurrentBlock(CurvatureBlock):
    """KFAC-expand block of a recurrent layer (see the module docstring).

    Subclasses (one per layer type, registered) define:

    * ``layer_class``, ``cell_class``, ``gates``; ``cell_methods``, the cell
      methods the step reproduces (a cell subclass overriding one is
      rejected);
    * :meth:`_dropout_supported`;
    * :meth:`_input_bias` (the bias added to ``Z_in``);
    * :meth:`_cell_step`: one step on ``Z_in[:, t]``, returning the output,
      the new states and ``[(extras key, [B, units] tensor)]`` to record;
    * :meth:`_pieces` and :meth:`_a_source` (which recorded tensor feeds which
      ``A`` statistic); :meth:`_output_locations` when a ``G`` statistic is
      not the gradient of ``Z_in`` itself.
    """

    layer_class = None
    cell_class = None
    gates = None
    cell_methods = ("call",)

    def __init__(self, layer):
        super().__init__(layer)
        self.pieces = self._pieces(layer.cell)

    # -- which layers -------------------------------------------------------
    @classmethod
    def matches(cls, layer):
        if not isinstance(layer, keras.layers.RNN):
            return False
        if type(layer).call not in (cls.layer_class.call, keras.layers.RNN.call):
            return False
        if type(layer).inner_loop not in (cls.layer_class.inner_loop, keras.layers.RNN.inner_loop):
            return False
        cell = getattr(layer, "cell", None)
        if not isinstance(cell, cls.cell_class):
            return False
        if any(getattr(type(cell), m) is not getattr(cls.cell_class, m) for m in cls.cell_methods):
            return False
        return (
            not layer.stateful
            and not getattr(cell, "lora_enabled", False)
            and getattr(cell, "quantization_mode", None) is None
            and 0.0 <= cell.dropout < 1.0
            and 0.0 <= cell.recurrent_dropout < 1.0
            and cls._dropout_supported(cell)
        )

    @classmethod
    def _dropout_supported(cls, cell):
        return True

    @staticmethod
    def layer_variables(layer):
        cell = layer.cell
        return [cell.kernel, cell.recurrent_kernel] + ([cell.bias] if cell.bias is not None else [])

    # -- capture ------------------------------------------------------------
    @classmethod
    def capture_call(cls, layer, original_call, record, sequences, initial_state=None, mask=None, training=False):
        """The layer's forward pass (``RNN.call``) with ``Z_in`` tapped and the step inputs recorded."""
        cell = layer.cell
        if initial_state is None:
            initial_state = layer.get_initial_state(batch_size=ops.shape(sequences)[0])
        if not tree.is_nested(initial_state):
            initial_state = [initial_state]
        initial_state = tree.map_structure(
            lambda s: keras_backend.convert_to_tensor(s, dtype=cell.compute_dtype), list(initial_state)
        )
        if tree.is_nested(mask):
            mask = mask[0]
        # The layer's own dropout masks (one per sequence, shared by all steps), drawn as RNN.call draws them.
        layer._maybe_config_dropout_masks(cell, sequences[:, 0, :], initial_state)
        input_mask = cell._dropout_mask if training and cell.dropout > 0 else None
        recurrent_mask = cell._recurrent_dropout_mask if training and cell.recurrent_dropout > 0 else None

        inputs = sequences if input_mask is None else sequences * ops.expand_dims(input_mask, 1)
        record.inputs = inputs
        projected = ops.matmul(inputs, cell.kernel)
        bias = cls._input_bias(cell)
        if bias is not None:
            projected = ops.add(projected, bias)
        projected = record.tap(projected)

        keys = []

        def step(projected_t, states):
            output, new_states, recorded = cls._cell_step(cell, projected_t, list(states), recurrent_mask)
            keys[:] = [key for key, _ in recorded]
            # One tensor (not a tuple): Keras's unrolled masked loop handles single outputs only.
            return ops.concatenate([output] + [value for _, value in recorded], axis=-1), new_states

        last_output, outputs, states = keras_backend.rnn(
            step,
            projected,
            initial_state,
            go_backwards=layer.go_backwards,
            mask=mask,
            unroll=layer.unroll,
            input_length=sequences.shape[1],
            zero_output_for_mask=layer.zero_output_for_mask,
            return_all_outputs=True,
        )
        units = cell.units
        recorded = outputs[..., units:]
        if layer.go_backwards:  # processing order -> the order of the input (and of Z_in)
            recorded = ops.flip(recorded, axis=1)
        extras = {key: recorded[..., i * units:(i + 1) * units] for i, key in enumerate(keys)}
        if mask is not None:
            mask = tf.cast(mask, tf.float32)
            extras["mask"] = mask[..., 0] if mask.shape.rank == 3 else mask
        record.extras = extras

        last_output = ops.cast(last_output[..., :units], layer.compute_dtype)
        outputs = ops.cast(outputs[..., :units], layer.compute_dtype)
        states = [ops.cast(s, layer.compute_dtype) for s in tree.flatten(states)]
        layer._maybe_reset_dropout_masks(cell)
        output = outputs if layer.return_sequences else last_output
        if layer.return_state:
            return output, *states
        return output

    @classmethod
    def _input_bias(cls, cell):
        return cell.bias

    @classmethod
    def _cell_step(cls, cell, projected, states, recurrent_mask):
        raise NotImplementedError

    # -- statistics ---------------------------------------------------------
    def _pieces(self, cell):
        raise NotImplementedError

    def _a_source(self, name):
        """The ``record.extras`` key (or ``"inputs"``) of the rows of ``A`` statistic ``name``."""
        raise NotImplementedError

    def _output_locations(self, name, call, grad):
        """``[B, T, k*units]`` rows of ``G`` statistic ``name`` (default: the gradient of ``Z_in``)."""
        return grad

    @property
    def units(self):
        return int(self.layer.cell.units)

    def _a_has_bias(self, name):
        return any(p.a == name and p.bias is not None for p in self.pieces)

    def _a_dim(self, name):
        kernel = self.variables[0] if self._a_source(name) == "inputs" else self.variables[1]
        return int(kernel.shape[0]) + int(self._a_has_bias(name))

    def statistic_shapes(self):
        shapes = {}
        for piece in self.pieces:
            shapes.setdefault(piece.a, (self._a_dim(piece.a),) * 2)
        size = self.gates * self.units
        for piece in self.pieces:
            shapes.setdefault(piece.g, (size, size))
        return shapes

    def needs_output_grads(self, name):
        return not any(p.a == name for p in self.pieces)

    @staticmethod
    def _weighted(rows, call):
        mask = call.extras.get("mask")
        return rows if mask is None else rows * mask[..., None]

    def compute_statistic(self, name, calls, output_grads):
        if any(p.a == name for p in self.pieces):
            parts = []
            for call in calls:
                source = self._a_source(name)
                rows = tf.cast(call.inputs if source == "inputs" else call.extras[source], tf.float32)
                if self._a_has_bias(name):
                    rows = tf.concat([rows, tf.ones_like(rows[..., :1])], axis=-1)
                parts.append(tf.reshape(self._weighted(rows, call), (-1, self._a_dim(name))))
            a = tf.concat(parts, axis=0)
            examples = tf.cast(tf.shape(calls[0].inputs)[0], tf.float32)
            return tf.matmul(a, a, transpose_a=True) / examples
        parts, count = [], 0.0
        for call, grad in zip(calls, output_grads()):
            rows = self._weighted(self._output_locations(name, call, grad), call)
            parts.append(tf.reshape(rows, (-1, self.gates * self.units)))
            mask = call.extras.get("mask")
            count += tf.reduce_sum(mask) if mask is not None else tf.cast(tf.shape(rows)[0] * tf.shape(rows)[1], tf.float32)
        g = tf.concat(parts, axis=0)
        return tf.matmul(g, g, transpose_a=True) / tf.maximum(count, 1.0)

    # -- preconditioner -----------------------------------------------------
    def _users(self, name):
        return [p for p in self.pieces if name in (p.a, p.g)]

    def _part(self, piece, name):
        """The preconditioner part of statistic ``name`` used by ``piece``."""
        return "inverse" if len(self._users(name)) == 1 else piece.name

    @staticmethod
    def _g_block(g, piece):
        start, stop = piece.columns
        return g[start:stop, start:stop]

    def _factor_pair(self, piece, statistics):
        return statistics[piece.a], self._g_block(statistics[piece.g], piece)

    def preconditioner_layout(self, name):
        """One damped inverse per piece using statistic ``name`` (``"inverse"`` when only one does)."""
        layout = {}
        for piece in self._users(name):
            if name == piece.a:
                shape = (self._a_dim(name),) * 2
            else:
                shape = (piece.columns[1] - piece.columns[0],) * 2
            layout[self._part(piece, name)] = (shape, "identity")
        return layout

    def _damped_inverse(self, piece, name, statistics, damping, split_dim):
        a, g = self._factor_pair(piece, statistics)
        pi = linalg.pi_damping(a, g)
        root = tf.sqrt(tf.cast(damping, tf.float32))
        if name == piece.a:
            return linalg.block_diagonal_damped_inverse(a, pi * root, split_dim)
        return linalg.block_diagonal_damped_inverse(g, root / pi, split_dim)

    def compute_preconditioner(self, name, statistics, damping, split_dim=None):
        parts, ok = {}, tf.constant(True)
        for piece in self._users(name):
            inverse, success = self._damped_inverse(piece, name, statistics, damping, split_dim)
            parts[self._part(piece, name)] = inverse
            ok = tf.logical_and(ok, success)
        return parts, ok

    def compute_inverse(self, name, statistics, damping, split_dim=None):
        """The damped inverse of statistic ``name`` as the first piece using it pairs it."""
        return self._damped_inverse(self._users(name)[0], name, statistics, damping, split_dim)

    def damped_fisher_trace(self, statistics, damping):
        # sum over pieces of tr(A (x) G) = tr A tr G, plus damping times the parameter count.
        total, size = 0.0, 0
        for piece in self.pieces:
            a, g = self._factor_pair(piece, statistics)
            total += tf.linalg.trace(a) * tf.linalg.trace(g)
            size += int(a.shape[-1]) * int(g.shape[-1])
        return total + damping * float(size)

    def _gradient_matrix(self, piece, grads):
        start, stop = piece.columns
        matrix = tf.cast(grads[piece.variable], tf.float32)[:, start:stop]
        if piece.bias is not None:
            bias = tf.cast(grads[2], tf.float32)
            row = bias[start:stop] if piece.bias == "vector" else bias[piece.bias, start:stop]
            matrix = tf.concat([matrix, row[None, :]], axis=0)
        return matrix

    def apply_preconditioner(self, grads, state):
        """``(A + pi sqrt(l) I)^-1 [dK; db] (G + sqrt(l)/pi I)^-1`` for every piece, reassembled."""
        columns = {0: [], 1: []}
        bias_rows = collections.defaultdict(list)
        for piece in self.pieces:
            a_inverse = state[piece.a][self._part(piece, piece.a)]
            g_inverse = state[piece.g][self._part(piece, piece.g)]
            matrix = a_inverse @ self._gradient_matrix(piece, grads) @ g_inverse
            if piece.bias is not None:
                bias_rows[piece.bias].append((piece.columns[0], matrix[-1]))
                matrix = matrix[:-1]
            columns[piece.variable].append((piece.columns[0], matrix))

        def joined(parts):
            return tf.concat([m for _, m in sorted(parts, key=lambda p: p[0])], axis=-1)

        out = [joined(columns[0]), joined(columns[1])]
        if len(self.variables) == 3:
            if "vector" in bias_rows:
                out.append(joined(bias_rows["vector"]))
            else:
                out.append(tf.stack([joined(bias_rows[r]) for r in sorted(bias_rows)]))
        return out
