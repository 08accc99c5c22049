"""Per-channel Kronecker factors of a depthwise convolution (shared by two blocks).

A depthwise convolution with kernel ``w`` of shape ``(k..., C, m)`` (``m`` the
depth multiplier) is ``C`` independent convolutions: input channel ``c`` alone
is convolved with the ``K x m`` matrix ``W_c = w[..., c, :]`` (``K = prod(k)``
window positions) into the outputs ``c * m + j``, ``j < m`` (TensorFlow's
channel order). Each channel is therefore a KFC layer of its own (Grosse &
Martens, "A Kronecker-factored approximate Fisher matrix for convolution
layers", ICML 2016) with input ``a_{n,t,c}`` (the ``K`` values of channel
``c`` in the window feeding output location ``t``, plus a trailing 1 when the
``m`` outputs of the channel have a bias) and output gradient ``g_{n,t,c}``
(the ``m`` per-example gradients at location ``t``)::

    A_c = E_n[ sum_t a_{n,t,c} a_{n,t,c}^T ]          (K (+1) x K (+1))
    G_c = E_n[ (1/|T|) sum_t g_{n,t,c} g_{n,t,c}^T ]  (m x m)

the convention of :class:`~keras_hoopt.blocks.KroneckerBlock` (the Fisher
block of channel ``c`` is ``A_c (x) G_c``). The per-example gradient of
``[W_c; b_c]`` is ``sum_t a_{n,t,c} g_{n,t,c}^T``. Channels are assumed
independent (the Fisher is block-diagonal over channels), so the block keeps
the batched statistics ``[C, K (+1), K (+1)]`` and ``[C, m, m]`` and
preconditions each channel with its own factored Tikhonov damping
``pi_c = sqrt((tr A_c / dim A_c) / (tr G_c / m))``::

    [W_c; b_c] <- (A_c + pi_c sqrt(l) I)^-1 [dW_c; db_c] (G_c + sqrt(l) / pi_c I)^-1

With ``m = 1`` every ``G_c`` is ``1 x 1`` (the per-channel mean squared
output gradient).
"""

import tensorflow as tf

from keras_hoopt import linalg

CHANNELS_LAST = "channels_last"
CHANNELS_FIRST = "channels_first"


def _prod(values):
    out = 1
    for v in values:
        out *= int(v)
    return out


def to_channels_last(x, data_format):
    """``[B, spatial..., C]`` view of a ``data_format`` tensor."""
    if data_format != CHANNELS_FIRST:
        return x
    rank = x.shape.rank
    return tf.transpose(x, [0] + list(range(2, rank)) + [1])


def to_channels_first(x):
    """Inverse of :func:`to_channels_last` for a ``channels_first`` layer."""
    rank = x.shape.rank
    return tf.transpose(x, [0, rank - 1] + list(range(1, rank - 1)))


def bias_shape(layer, channels):
    """The broadcast shape of the bias in ``layer``'s own ``call``."""
    if layer.data_format == CHANNELS_LAST:
        return (1,) * (layer.rank + 1) + (channels,)
    return (1, channels) + (1,) * layer.rank


def bias_add_misbroadcasts(layer, channels):
    """Whether Keras's ``ops.add`` would add this ``channels_first`` layer's bias to the wrong axis.

    The TensorFlow backend's ``add`` turns ``x + reshape(bias, (1, C, 1...))``
    into ``tf.nn.bias_add``, choosing ``NHWC`` whenever the *last* axis of
    ``x`` has ``C`` entries; a ``channels_first`` output whose last spatial
    size equals its channel count then gets its bias along that spatial axis.
    A block cannot describe that layer (its "bias" is no longer per channel):
    ``matches`` rejects it where the layer's build shape tells.
    """
    if layer.data_format != CHANNELS_FIRST or not layer.use_bias:
        return False
    shapes = getattr(layer, "_build_shapes_dict", None)
    if not shapes or len(shapes) != 1:
        return False
    try:
        output_shape = layer.compute_output_shape(tuple(shapes.values())[0])
    except Exception:  # noqa: BLE001 - an unusable build shape: nothing to tell
        return False
    return output_shape[-1] is not None and int(output_shape[-1]) == int(channels)


def supported_geometry(layer, rank):
    """The options the patch extraction handles (Keras itself allows no others today)."""
    return (
        getattr(layer, "rank", None) == rank
        and layer.padding in ("valid", "same")
        and layer.data_format in (CHANNELS_LAST, CHANNELS_FIRST)
        and isinstance(layer.depth_multiplier, int)
        and layer.depth_multiplier >= 1
        and len(layer.kernel_size) == rank
        and len(layer.strides) == rank
        and len(layer.dilation_rate) == rank
    )


class PerChannelKronecker:
    """The per-channel factors ``A_c``, ``G_c`` of one depthwise kernel (see the module docstring).

    Args:
        layer: the depthwise or separable layer (its geometry: ``kernel_size``,
            ``strides``, ``dilation_rate``, ``padding``, ``data_format``).
        kernel: its depthwise kernel variable ``(k..., C, m)``.
        has_bias: whether a bias of ``C * m`` entries follows this kernel
            directly (a depthwise layer's; a separable layer's bias belongs
            to its pointwise part).
    """

    def __init__(self, layer, kernel, has_bias):
        self.layer = layer
        self.kernel_shape = tuple(int(d) for d in kernel.shape)
        self.window = _prod(self.kernel_shape[:-2])
        self.channels = self.kernel_shape[-2]
        self.multiplier = self.kernel_shape[-1]
        self.has_bias = bool(has_bias)

    @property
    def input_dim(self):
        return self.window + int(self.has_bias)

    def shapes(self):
        """``(A shape, G shape)``: ``[C, K (+1), K (+1)]`` and ``[C, m, m]``."""
        return (self.channels, self.input_dim, self.input_dim), (self.channels, self.multiplier, self.multiplier)

    # -- statistics ---------------------------------------------------------
    def patches(self, inputs):
        """``[B, T, K, C]`` float32 windows of every channel (zero padding as the layer's)."""
        layer = self.layer
        x = to_channels_last(tf.cast(inputs, tf.float32), layer.data_format)
        kernel_size, strides, rates = list(layer.kernel_size), list(layer.strides), list(layer.dilation_rate)
        if len(kernel_size) == 1:  # a 1D convolution is a 2D one of height 1
            x = x[:, None]
            kernel_size, strides, rates = [1] + kernel_size, [1] + strides, [1] + rates
        patches = tf.image.extract_patches(
            x,
            sizes=[1, *kernel_size, 1],
            strides=[1, *strides, 1],
            rates=[1, *rates, 1],
            padding=layer.padding.upper(),
        )
        # extract_patches orders a patch (window row, window column, channel).
        return tf.reshape(patches, (tf.shape(x)[0], -1, self.window, self.channels))

    def input_rows(self, inputs):
        """``[C, rows, K (+1)]``: each channel's windows (and bias 1) over examples and locations."""
        patches = self.patches(inputs)
        rows = tf.transpose(tf.reshape(patches, (-1, self.window, self.channels)), (2, 0, 1))
        if self.has_bias:
            rows = tf.concat([rows, tf.ones_like(rows[..., :1])], axis=-1)
        return rows

    def output_rows(self, grad, data_format=None):
        """``[C, rows, m]`` per-example gradients of each channel's ``m`` outputs.

        ``data_format``: the layout of ``grad`` (default: the layer's).
        """
        g = to_channels_last(tf.cast(grad, tf.float32), data_format or self.layer.data_format)
        g = tf.reshape(g, (-1, self.channels, self.multiplier))
        return tf.transpose(g, (1, 0, 2))

    def input_factor(self, inputs_per_call, examples):
        """``A = [A_c]``: sum over locations, mean over examples."""
        rows = tf.concat([self.input_rows(x) for x in inputs_per_call], axis=1)
        return tf.matmul(rows, rows, transpose_a=True) / examples

    def output_factor(self, grads_per_call, data_format=None):
        """``G = [G_c]``: mean over examples and locations."""
        rows = tf.concat([self.output_rows(g, data_format) for g in grads_per_call], axis=1)
        return tf.matmul(rows, rows, transpose_a=True) / tf.cast(tf.shape(rows)[1], tf.float32)

    # -- inverses and preconditioning ----------------------------------------
    @staticmethod
    def damped_inverse(a_factor, g_factor, which, damping, split_dim=None):
        """``(inverse, ok)`` of ``A_c + pi_c sqrt(l) I`` (``which="A"``) or ``G_c + sqrt(l)/pi_c I``.

        ``split_dim`` (THOR): only the diagonal blocks of that size of each
        ``A_c``/``G_c`` are kept (the inverse of a block-diagonal matrix is
        the block-diagonal of the blocks' inverses).
        """
        pi = linalg.pi_damping(a_factor, g_factor)  # [C]: one ratio per channel
        root = tf.sqrt(tf.cast(damping, tf.float32))
        factor_damping = pi * root if which == "A" else root / pi
        matrix = a_factor if which == "A" else g_factor
        return linalg.damped_inverse(_block_diagonal_part(matrix, split_dim), factor_damping[:, None, None])

    @staticmethod
    def damped_fisher_trace(a_factor, g_factor, damping):
        """``sum_c tr(A_c (x) G_c) + l * dim``."""
        traces = tf.linalg.trace(a_factor) * tf.linalg.trace(g_factor)
        size = float(_prod(a_factor.shape[:-1]) * int(g_factor.shape[-1]))
        return tf.reduce_sum(traces) + damping * size

    def gradient_matrices(self, kernel_grad, bias_grad=None):
        """``[C, K (+1), m]``: each channel's ``[dW_c; db_c]``."""
        matrices = tf.reshape(tf.cast(kernel_grad, tf.float32), (self.window, self.channels, self.multiplier))
        matrices = tf.transpose(matrices, (1, 0, 2))
        if self.has_bias:
            bias = tf.reshape(tf.cast(bias_grad, tf.float32), (self.channels, 1, self.multiplier))
            matrices = tf.concat([matrices, bias], axis=1)
        return matrices

    def precondition(self, kernel_grad, bias_grad, a_inverse, g_inverse):
        """``[kernel update]`` (and ``bias update``): ``A_c^-1 [dW_c; db_c] G_c^-1`` per channel."""
        matrices = a_inverse @ self.gradient_matrices(kernel_grad, bias_grad) @ g_inverse
        kernel = tf.reshape(tf.transpose(matrices[:, : self.window], (1, 0, 2)), self.kernel_shape)
        if not self.has_bias:
            return [kernel]
        return [kernel, tf.reshape(matrices[:, self.window], (-1,))]


def _block_diagonal_part(matrix, split_dim):
    """``matrix`` with the entries outside its diagonal ``split_dim`` blocks set to 0."""
    size = int(matrix.shape[-1])
    if split_dim is None or size <= split_dim:
        return matrix
    block = tf.range(size) // split_dim
    mask = tf.cast(tf.equal(block[:, None], block[None, :]), matrix.dtype)
    return matrix * mask
