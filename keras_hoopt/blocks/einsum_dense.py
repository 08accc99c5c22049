"""Curvature block for ``keras.layers.EinsumDense`` (and the projections of attention layers)."""

import math
import re

import keras
import tensorflow as tf
from keras import ops

from keras_hoopt.blocks.base import KroneckerBlock
from keras_hoopt.blocks.registry import register_block

# The three equation forms EinsumDense accepts (keras/src/layers/core/einsum_dense.py,
# `_analyze_einsum_string`): no ellipsis, an ellipsis leading both the input and the
# output, or one trailing both (then the input names at least two axes).
_EQUATION_FORMS = (
    (re.compile(r"([a-zA-Z]+),([a-zA-Z]+)->([a-zA-Z]+)"), None),
    (re.compile(r"\.\.\.([a-zA-Z]+),([a-zA-Z]+)->\.\.\.([a-zA-Z]+)"), "left"),
    (re.compile(r"([a-zA-Z]{2,})\.\.\.,([a-zA-Z]+)->([a-zA-Z]+)\.\.\."), "right"),
)


class _EinsumLayout:
    """Roles of the axes of an EinsumDense equation ``input,kernel->output``.

    * ``contracted``: kernel axes in the input but not the output (summed by
      the einsum): the input side of the kernel matrix, in kernel order;
    * ``produced``: kernel axes in the output but not the input: its output
      side, in kernel order;
    * ``shared``: kernel axes in all three (a different matrix per slice);
    * ``summed``: input axes in neither the kernel nor the output (the
      einsum sums the input over them before it meets the kernel);
    * locations: every other input axis (they are in the output too), the
      ellipsis included; the first input axis is the example axis.

    Ellipsis axes are named ``"0"``, ``"1"``, ... once the rank is known
    (:meth:`axes`), so they never collide with the equation's letters.
    """

    def __init__(self, input_spec, kernel_spec, output_spec, ellipsis):
        self.input_spec, self.kernel_spec, self.output_spec = input_spec, kernel_spec, output_spec
        self.ellipsis = ellipsis
        in_input, in_output = set(input_spec), set(output_spec)
        self.contracted = [a for a in kernel_spec if a in in_input and a not in in_output]
        self.produced = [a for a in kernel_spec if a in in_output and a not in in_input]
        self.shared = [a for a in kernel_spec if a in in_input and a in in_output]
        self.unmatched = [a for a in kernel_spec if a not in in_input and a not in in_output]
        self.summed = [a for a in input_spec if a not in kernel_spec and a not in in_output]
        # Kernel axes in (contracted..., produced...) order: the [d_in, d_out] matrix.
        self.kernel_permutation = [kernel_spec.index(a) for a in self.contracted + self.produced]

    @classmethod
    def parse(cls, equation):
        """The layout of ``equation``, or ``None`` for a form EinsumDense does not accept."""
        if not isinstance(equation, str):
            return None
        for pattern, ellipsis in _EQUATION_FORMS:
            match = pattern.fullmatch(equation)
            if match:
                return cls(*match.groups(), ellipsis)
        return None

    @property
    def well_formed(self):
        """No repeated axis in a spec (a diagonal), and every kernel axis in the input or output."""
        specs = (self.input_spec, self.kernel_spec, self.output_spec)
        return all(len(set(s)) == len(s) for s in specs) and not self.unmatched

    def axes(self, spec, rank):
        """Axis names of a tensor of ``rank`` described by ``spec`` (ellipsis expanded)."""
        elided = [str(i) for i in range(rank - len(spec))]
        if self.ellipsis == "left":
            return elided + list(spec)
        if self.ellipsis == "right":
            return list(spec) + elided
        return list(spec)

    def example_axis(self, rank=None):
        """The name of the input's first axis (``None`` when it is an ellipsis axis of unknown rank)."""
        if self.ellipsis != "left":
            return self.input_spec[0]
        if rank is None:
            return None
        return self.axes(self.input_spec, rank)[0]

    def is_location(self, axis):
        return axis not in self.kernel_spec and (axis in self.output_spec or axis.isdigit())


@register_block
class EinsumDenseBlock(KroneckerBlock):
    """K-FAC block of an EinsumDense layer (the projections of MultiHeadAttention et al.).

    EinsumDense computes ``s = einsum(equation, x, W) (+ b)``. Its axes are
    sorted by role (see the table): the kernel is the matrix
    ``W [d_in, d_out]`` obtained by transposing its axes to
    ``(contracted..., produced...)`` and reshaping, where ``d_in`` is the
    product of the contracted sizes and ``d_out`` of the produced ones. Every
    other input axis is a location ``t`` (the first input axis is the example
    axis ``n``), so the layer is a Dense layer applied at every location:
    ``s_{n,t} = W^T a_{n,t} (+ b)``, with ``a_{n,t}`` the input's contracted
    axes at ``(n, t)`` in kernel order. Input axes that appear neither in the
    kernel nor in the output are summed by the einsum: ``a_{n,t}`` is the
    input summed over them (exact, as the sum is linear).

    | equation             | contracted | produced | locations  |
    |----------------------|------------|----------|------------|
    | ``ab,bc->ac``        | b          | c        | (a)        |
    | ``abc,cde->abde``    | c          | d, e     | (a), b     |
    | ``abcd,cde->abe``    | c, d       | e        | (a), b     |
    | ``...b,bc->...c``    | b          | c        | (...)      |
    | ``bsd,kdh->bskh``    | d          | k, h     | (b), s     |

    Factors (Grosse & Martens' Omega and Gamma, as for Dense on sequences
    and Conv2D; see :class:`~keras_hoopt.blocks.base.KroneckerBlock`)::

        A = E_n[ sum_t a_{n,t} a_{n,t}^T ]          (d_in (+1) x d_in (+1))
        G = E_n[ (1/|T|) sum_t g_{n,t} g_{n,t}^T ]  (d_out x d_out)

    with ``g_{n,t}`` the per-example gradient of the loss w.r.t. the
    pre-activation at ``(n, t)``, its produced axes in kernel order. The
    Fisher block of the kernel is ``A (x) G`` (K-FAC, Martens & Grosse 2015,
    arXiv 1503.05671; the sum over locations is KFC's, Grosse & Martens 2016,
    arXiv 1602.01407). The preconditioned kernel gradient is transposed and
    reshaped back to the kernel's own axis order.

    Bias: when ``bias_axes`` names exactly the produced axes, the bias is a
    vector of ``d_out`` added at every location, folded into ``W`` as an
    extra input row (a trailing 1 in ``a``). A bias over some of them only, or
    over a location axis, is not a row of ``W``: the block then
    preconditions the kernel alone and the bias gets the optimizer's
    first-order update.

    Not handled (``matches`` is False, the layer falls back to a first-order
    update): shared axes (a kernel axis also in the input and the output,
    e.g. ``abc,bcd->abd``, one matrix per slice), a first input axis that is
    contracted or summed (no example axis), repeated axes in a spec, LoRA
    (``lora_rank``), quantized layers, and subclasses that override ``call``.
    """

    kind = "einsum_dense"

    def __init__(self, layer):
        self.layout = _EinsumLayout.parse(layer.equation)
        sizes = dict(zip(self.layout.kernel_spec, (int(d) for d in layer.kernel.shape)))
        self._contracted_sizes = [sizes[a] for a in self.layout.contracted]
        self._produced_sizes = [sizes[a] for a in self.layout.produced]
        super().__init__(layer)

    # -- matching and variables ----------------------------------------------
    @classmethod
    def matches(cls, layer):
        if not (
            isinstance(layer, keras.layers.EinsumDense)
            and type(layer).call is keras.layers.EinsumDense.call
            and not getattr(layer, "lora_enabled", False)
            and not getattr(layer, "lora_rank", None)  # LoRA is enabled when the layer builds
            and getattr(layer, "quantization_mode", None) is None
        ):
            return False
        layout = _EinsumLayout.parse(layer.equation)
        if layout is None or not layout.well_formed or layout.shared:
            return False
        spec = getattr(layer, "input_spec", None)
        rank = getattr(spec, "ndim", None) if spec is not None and not isinstance(spec, (list, tuple)) else None
        example = layout.example_axis(rank)
        return example is None or layout.is_location(example)

    @staticmethod
    def _folds_bias(layer):
        """Whether ``layer.bias`` spans exactly the produced axes (one bias per output unit)."""
        if layer.bias is None or not layer.bias_axes:
            return False
        layout = _EinsumLayout.parse(layer.equation)
        bias_axes = str(layer.bias_axes)
        return len(set(bias_axes)) == len(bias_axes) and set(bias_axes) == set(layout.produced)

    @staticmethod
    def layer_variables(layer):
        folded = EinsumDenseBlock._folds_bias(layer)
        return [layer.kernel] + ([layer.bias] if folded else [])

    # -- forward pass --------------------------------------------------------
    @classmethod
    def capture_call(cls, layer, original_call, record, inputs, training=None):
        # EinsumDense.call, with the pre-activation tapped.
        record.inputs = inputs
        outputs = ops.einsum(layer.equation, inputs, layer.kernel)
        if layer.bias is not None:
            outputs = ops.add(outputs, layer.bias)
        outputs = record.tap(outputs)
        return layer.activation(outputs) if layer.activation is not None else outputs

    # -- sizes ---------------------------------------------------------------
    @property
    def input_dim(self):
        return math.prod(self._contracted_sizes) + int(self.has_bias)

    @property
    def output_dim(self):
        return math.prod(self._produced_sizes)

    # -- rows ----------------------------------------------------------------
    def input_rows(self, call):
        """``[N * |T|, d_in (+1)]``: the contracted axes (kernel order) at every location."""
        layout = self.layout
        x = tf.cast(call.inputs, tf.float32)
        axes = layout.axes(layout.input_spec, x.shape.rank)
        summed = [i for i, a in enumerate(axes) if a in layout.summed]
        if summed:
            x = tf.reduce_sum(x, axis=summed)
            axes = [a for a in axes if a not in layout.summed]
        order = [a for a in axes if a not in layout.contracted] + layout.contracted
        x = tf.transpose(x, [axes.index(a) for a in order])
        rows = tf.reshape(x, (-1, self.input_dim - int(self.has_bias)))
        return self._append_bias_column(rows)

    def output_rows(self, grad):
        """``[N * |T|, d_out]``: the produced axes (kernel order) of ``g`` at every location."""
        layout = self.layout
        axes = layout.axes(layout.output_spec, grad.shape.rank)
        order = [a for a in axes if a not in layout.produced] + layout.produced
        grad = tf.transpose(grad, [axes.index(a) for a in order])
        return tf.reshape(grad, (-1, self.output_dim))

    # -- kernel <-> matrix -----------------------------------------------------
    def _bias_axes_in_output_order(self):
        return [a for a in self.layout.output_spec if a in self.layer.bias_axes]

    def _bias_permutation(self):
        """Permutation of the (squeezed) bias axes, in output order, to kernel order."""
        in_output = self._bias_axes_in_output_order()
        return [in_output.index(a) for a in self.layout.produced]

    def _bias_row(self, bias):
        in_output = self._bias_axes_in_output_order()
        sizes = dict(zip(self.layout.produced, self._produced_sizes))
        bias = tf.reshape(tf.cast(bias, tf.float32), [sizes[a] for a in in_output])
        return tf.reshape(tf.transpose(bias, self._bias_permutation()), (1, self.output_dim))

    def _bias_from_row(self, row):
        permutation = self._bias_permutation()
        inverse = [permutation.index(i) for i in range(len(permutation))]
        bias = tf.transpose(tf.reshape(row, self._produced_sizes), inverse)
        return tf.reshape(bias, self.variables[1].shape)

    def _kernel_matrix(self, kernel):
        kernel = tf.transpose(tf.cast(kernel, tf.float32), self.layout.kernel_permutation)
        return tf.reshape(kernel, (-1, self.output_dim))

    def _kernel_from_matrix(self, matrix):
        permutation = self.layout.kernel_permutation
        inverse = [permutation.index(i) for i in range(len(permutation))]
        kernel = tf.reshape(matrix, self._contracted_sizes + self._produced_sizes)
        return tf.transpose(kernel, inverse)

    def gradient_matrix(self, grads):
        """``[d_in (+1), d_out]`` matrix of the kernel gradient (axes transposed) and bias row."""
        matrix = self._kernel_matrix(grads[0])
        if self.has_bias:
            matrix = tf.concat([matrix, self._bias_row(grads[1])], axis=0)
        return matrix

    def gradients_from_matrix(self, matrix):
        if self.has_bias:
            return [self._kernel_from_matrix(matrix[:-1]), self._bias_from_row(matrix[-1])]
        return [self._kernel_from_matrix(matrix)]
