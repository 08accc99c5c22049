"""Shared K-FAC machinery of the convolution blocks (KFC, Grosse & Martens 2016).

Two private bases, one per kind of convolution; each layer type's block (its
own small module) only names its Keras class and its ``kind``:

* :class:`ConvolutionBlock`: ``Conv1D``, ``Conv2D``, ``Conv3D`` (``s = W a``
  at every output location, ``a`` the im2col patch of the input);
* :class:`ConvolutionTransposeBlock`: ``Conv1DTranspose``, ``Conv2DTranspose``,
  ``Conv3DTranspose`` (the kernel gradient at every *input* location is
  ``x_t`` against the patch of the output gradient that ``x_t`` feeds).

Both keep the :class:`~keras_hoopt.blocks.base.KroneckerBlock` convention: a
factor built from per-location rows is ``A = E_n[sum_t a a^T]`` (sum over
locations, mean over examples) on the side of the layer input and
``G = E_n[mean_t g g^T]`` on the side of the output gradient, the Fisher block
being ``A (x) G``.

Reference: R. Grosse, J. Martens. A Kronecker-factored approximate Fisher
matrix for convolution layers. ICML 2016 (arXiv 1602.01407).
"""

import itertools
import math

import tensorflow as tf
from keras import ops
from keras.src.layers.convolutional.base_conv import BaseConv
from keras.src.layers.convolutional.base_conv_transpose import BaseConvTranspose

from keras_hoopt.blocks.base import KroneckerBlock


def _channels_last(x, data_format):
    """``[B, C, *spatial]`` -> ``[B, *spatial, C]`` for ``channels_first`` (else unchanged)."""
    if data_format != "channels_first":
        return x
    rank = x.shape.rank
    return tf.transpose(x, (0, *range(2, rank), 1))


def _bias_shape(layer):
    """Shape the bias is reshaped to before it is added (as Keras's conv layers do)."""
    if layer.data_format == "channels_last":
        return (1,) * (layer.rank + 1) + (layer.filters,)
    return (1, layer.filters) + (1,) * layer.rank


def _dimension(x, axis):
    static = x.shape[axis]
    return int(static) if static is not None else tf.shape(x)[axis]


def _sliced_patches(x, kernel_size, strides, dilation, padding):
    """im2col by strided slices (any rank): ``[B, *out, prod(kernel_size) * C]``.

    One strided slice of the (explicitly zero-padded) input per kernel tap, taps
    in row-major order, so the patch is ordered like the kernel's leading axes
    ``(k_1, ..., k_r, C)``. ``"same"`` pads as TensorFlow does:
    ``total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)``, ``total // 2``
    before. Used for rank 3, where ``tf.extract_volume_patches`` has neither
    dilation nor an XLA kernel.
    """
    batch, channels = _dimension(x, 0), _dimension(x, -1)
    paddings, out_sizes = [[0, 0]], []
    for axis, (k, s, d) in enumerate(zip(kernel_size, strides, dilation)):
        n = _dimension(x, axis + 1)
        effective = (k - 1) * d + 1
        if padding == "same":
            out = -(-n // s)
            total = (out - 1) * s + effective - n
            total = tf.maximum(total, 0) if tf.is_tensor(total) else max(total, 0)
            paddings.append([total // 2, total - total // 2])
        else:
            out = (n - effective) // s + 1
            paddings.append([0, 0])
        out_sizes.append(out)
    paddings.append([0, 0])
    x = tf.pad(x, paddings)
    taps = []
    for offsets in itertools.product(*(range(k) for k in kernel_size)):
        begin = [0] + [o * d for o, d in zip(offsets, dilation)] + [0]
        end = [batch] + [b + (out - 1) * s + 1 for b, out, s in zip(begin[1:], out_sizes, strides)] + [channels]
        taps.append(tf.strided_slice(x, begin, end, strides=[1, *strides, 1]))
    patches = tf.stack(taps, axis=-2)  # [B, *out, taps, C]
    return tf.reshape(patches, [batch, *out_sizes, len(taps) * channels])


def _extract_patches(x, kernel_size, strides, dilation, padding):
    """``[B, *out, prod(kernel_size) * C]`` im2col patches of a channels-last ``x``.

    Patch ``t`` holds the input values that a convolution with these
    ``strides``, ``dilation`` and ``padding`` (``"valid"`` or ``"same"``,
    TensorFlow's rule) multiplies with the kernel at output location ``t``,
    zeros where it reads padding, ordered like ``kernel.reshape(-1, C_out)``'s
    rows (kernel taps row-major, then channels).
    """
    rank = len(kernel_size)
    if rank == 3:
        return _sliced_patches(x, kernel_size, strides, dilation, padding)
    if rank == 1:  # a 1 x k image patch
        patches = _extract_patches(x[:, None], (1, *kernel_size), (1, *strides), (1, *dilation), padding)
        return patches[:, 0]
    return tf.image.extract_patches(
        x,
        sizes=[1, *kernel_size, 1],
        strides=[1, *strides, 1],
        rates=[1, *dilation, 1],
        padding=padding.upper(),
    )


def _unquantized_without_lora(layer):
    return not getattr(layer, "lora_enabled", False) and getattr(layer, "quantization_mode", None) is None


class ConvolutionBlock(KroneckerBlock):
    """K-FAC (KFC) block of a ``Conv{1,2,3}D`` layer: kernel ``(k_1, ..., k_r, C_in, C_out)``.

    The layer computes, at every output location ``t``, ``s_t = W^T a_t + b``
    with ``a_t`` the im2col patch (``prod(k) * C_in`` values ordered like the
    kernel's leading axes, zeros at padding, plus a trailing 1 for the bias).
    So the per-example gradient of the flattened kernel (bias as a last row) is
    ``sum_t a_{n,t} g_{n,t}^T`` and KFC's approximation (spatially homogeneous,
    spatially uncorrelated derivatives) gives ``F ~ A (x) G`` with::

        A = E_n[ sum_t a_{n,t} a_{n,t}^T ]          ((prod(k) C_in + 1)^2)
        G = E_n[ (1/|T|) sum_t g_{n,t} g_{n,t}^T ]   (C_out^2)

    (``|T|`` output locations; Grosse & Martens' ``Omega`` and ``Gamma`` with the
    spatial count in ``A``). Strides, dilation, ``"valid"``/``"same"`` padding
    (and ``"causal"`` for Conv1D: left padding by ``d (k - 1)``, then
    ``"valid"``), both data formats. Grouped convolutions (``groups > 1``), LoRA,
    quantized layers and subclasses that override ``call`` or
    ``convolution_op`` are left to the first-order fallback.

    Subclasses set ``layer_class`` (the Keras layer type) and ``kind``.
    """

    layer_class = None

    @classmethod
    def matches(cls, layer):
        return (
            isinstance(layer, cls.layer_class)
            and type(layer).call is cls.layer_class.call
            and type(layer).convolution_op is BaseConv.convolution_op
            and getattr(layer, "groups", 1) == 1
            and _unquantized_without_lora(layer)
        )

    @classmethod
    def capture_call(cls, layer, original_call, record, inputs):
        record.inputs = inputs
        # BaseConv.call (Conv2D, Conv3D) runs BaseConv.convolution_op, i.e. ops.conv with the
        # layer's settings; Conv1D.call the same after its causal left padding.
        padding = layer.padding
        if padding == "causal":
            inputs, padding = ops.pad(inputs, layer._compute_causal_padding()), "valid"
        outputs = ops.conv(
            inputs,
            layer.kernel,
            strides=list(layer.strides),
            padding=padding,
            dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )
        if layer.use_bias:
            outputs = ops.add(outputs, ops.reshape(layer.bias, _bias_shape(layer)))
        outputs = record.tap(outputs)
        return layer.activation(outputs) if layer.activation is not None else outputs

    def input_rows(self, call):
        """``[B * |T|, prod(k) * C_in (+1)]`` im2col patches of the layer input."""
        layer = self.layer
        x = _channels_last(tf.cast(call.inputs, tf.float32), layer.data_format)
        padding = layer.padding
        if padding == "causal":
            left = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
            x = tf.pad(x, [[0, 0], [left, 0], [0, 0]])
            padding = "valid"
        patches = _extract_patches(x, layer.kernel_size, layer.strides, layer.dilation_rate, padding)
        rows = tf.reshape(patches, (-1, self.input_dim - int(self.has_bias)))
        return self._append_bias_column(rows)

    def output_rows(self, grad):
        """``[B * |T|, C_out]`` per-example output gradients, one row per output location."""
        return tf.reshape(_channels_last(grad, self.layer.data_format), (-1, self.output_dim))


class ConvolutionTransposeBlock(KroneckerBlock):
    """K-FAC block of a ``Conv{1,2,3}DTranspose`` layer: kernel ``(k_1, ..., k_r, C_out, C_in)``.

    ``y = conv_transpose(x, W)`` is the adjoint of the convolution ``z -> x``
    with kernel ``W`` (``C_out -> C_in`` channels) and the layer's strides,
    dilation and padding, computed on the output's spatial size (which is
    where ``output_padding`` enters). Writing that convolution as
    ``x_t = sum_k W_k^T z_{s t + d k - p}``, the adjoint scatters every input
    location ``t`` to the outputs ``u = s t + d k - p`` and::

        dL/dW[k, c_out, c_in] = sum_t P_t[k, c_out] x_t[c_in]

    where ``P_t`` (``prod(k) * C_out``) is the im2col patch, *of the output
    gradient* ``g``, at input location ``t`` (zeros where it reads padding), for
    that same convolution. So ``kernel.reshape(prod(k) C_out, C_in)`` has the
    per-example gradient ``sum_t P_{n,t} x_{n,t}^T``: KFC's per-location
    outer-product form with the roles of the patch and the plain vector
    swapped. The factors, over the ``|T|`` *input* locations::

        A = E_n[ sum_t x_{n,t} x_{n,t}^T ]           (C_in^2, layer input)
        G = E_n[ (1/|T|) sum_t P_{n,t} P_{n,t}^T ]    ((prod(k) C_out)^2, output gradient)

    and ``F ~ A (x) G`` for the gradient matrix ``M = kernel.reshape(prod(k) C_out,
    C_in)^T`` (:meth:`gradient_matrix`; ``A`` on its rows, as for the other
    blocks). KFC's homogeneity assumption holds better over input locations
    than over output locations: with strides, every input location feeds the
    same pattern of outputs, while output locations differ in which taps they
    receive.

    The bias (over ``C_out``, ``db = sum_u g_u``) does not fit this
    factorisation (an output location receives a varying number of
    ``(t, k)`` pairs), so it is not preconditioned: :meth:`layer_variables`
    leaves it out and it takes the optimizer's first-order update.

    Strides, dilation, ``"valid"``/``"same"`` padding, ``output_padding``,
    both data formats. LoRA or quantized layers (should a Keras version add
    them) and subclasses that override ``call`` are left to the first-order
    fallback.

    Subclasses set ``layer_class`` (the Keras layer type) and ``kind``.
    """

    layer_class = None

    @classmethod
    def matches(cls, layer):
        return (
            isinstance(layer, cls.layer_class)
            and type(layer).call is BaseConvTranspose.call
            and layer.padding in ("valid", "same")
            and _unquantized_without_lora(layer)
        )

    @staticmethod
    def layer_variables(layer):
        return [layer.kernel]  # the bias is left to the first-order update (see the class docstring)

    @classmethod
    def capture_call(cls, layer, original_call, record, inputs):
        record.inputs = inputs
        outputs = ops.conv_transpose(
            inputs,
            layer.kernel,
            strides=list(layer.strides),
            padding=layer.padding,
            output_padding=layer.output_padding,
            dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )
        if layer.use_bias:
            outputs = ops.add(outputs, ops.reshape(layer.bias, _bias_shape(layer)))
        outputs = record.tap(outputs)
        return layer.activation(outputs) if layer.activation is not None else outputs

    @property
    def input_dim(self):
        return int(self.variables[0].shape[-1])  # C_in

    @property
    def output_dim(self):
        return math.prod(int(d) for d in self.variables[0].shape[:-1])  # prod(k) * C_out

    def input_rows(self, call):
        """``[B * |T|, C_in]``: the layer input at every input location."""
        x = _channels_last(tf.cast(call.inputs, tf.float32), self.layer.data_format)
        return tf.reshape(x, (-1, self.input_dim))

    def output_rows(self, grad):
        """``[B * |T|, prod(k) * C_out]``: the output-gradient patch ``P_t`` of every input location."""
        layer = self.layer
        g = _channels_last(grad, layer.data_format)
        patches = _extract_patches(g, layer.kernel_size, layer.strides, layer.dilation_rate, layer.padding)
        return tf.reshape(patches, (-1, self.output_dim))

    def gradient_matrix(self, grads):
        """``[C_in, prod(k) * C_out]``: the transposed ``kernel.reshape(-1, C_in)`` gradient."""
        return tf.transpose(tf.reshape(tf.cast(grads[0], tf.float32), (self.output_dim, self.input_dim)))

    def gradients_from_matrix(self, matrix):
        return [tf.reshape(tf.transpose(matrix), self.variables[0].shape)]
