"""Optimizers compared by the benchmarks, each with a small learning-rate grid."""

import re

import keras

import keras_hoopt


class _MuonWithAdamWOutput(keras.optimizers.Muon):
    """``keras.optimizers.Muon`` with biases and the model's output layer on its AdamW step.

    Muon (Jordan et al. 2024; Liu et al. 2025, arXiv:2502.16982) replaces the
    momentum of a 2-D weight by its nearest semi-orthogonal matrix (five
    Newton-Schulz iterations), scaled by ``0.2 * sqrt(max(n, m))`` so that its
    learning rate is on Adam's scale. Keras's implementation gives its AdamW
    step (at the same learning rate, ``adam_lr_ratio=1``) to every variable that
    is not 2-D (1-D biases and normalisation scales, but also convolution
    kernels and MultiHeadAttention's 3-D ``EinsumDense`` kernels) and to every
    variable whose path contains ``"embedding"`` (``exclude_embeddings=True``:
    any ``Embedding`` layer's ``embeddings``). Two more kinds of variable
    belong on AdamW by Muon's own rules and are not caught by them: biases that are 2-D
    (MultiHeadAttention's query/key/value biases, ``[heads, head_dim]``), and
    the final output layer, which Keras's documentation asks to name in
    ``exclude_layers``; the workloads name their layers differently, so this
    takes the last 2-D variable of the model (its output kernel: Keras lists a
    model's variables in layer order). Everything else is Keras's defaults
    (momentum 0.95, Nesterov, weight decay 0.004).
    """

    def __init__(self, learning_rate, exclude_layers=(), **kwargs):
        super().__init__(learning_rate=learning_rate, exclude_layers=[r"(^|/)bias$", *exclude_layers], **kwargs)

    def build(self, var_list):
        if not self.built:
            matrices = [variable for variable in var_list if len(variable.shape) == 2]
            if matrices:
                self.exclude_layers = [*self.exclude_layers, f"^{re.escape(matrices[-1].path)}$"]
        super().build(var_list)


# name -> (factory(lr, **workload.curvature_options), full grid, quick grid)
CURVATURE_OPTIMIZERS = (
    "kfac", "spngd", "thor", "spngd_fixed", "spngd_eigenbasis", "spngd_low_rank", "spngd_forward_mode",
    "spngd_central", "spngd_kronecker", "spngd_similarity_003", "spngd_qm1",
)
#: KFAC, SPNGD and THOR run with their defaults (issue 13): on these losses the quadratic model's
#: step size and momentum with Levenberg-Marquardt damping from lambda = 1e-4; the learning rate
#: scales the model's minimiser. ``spngd_fixed`` is the fixed step the defaults replaced.
_ADAPTIVE_GRID, _ADAPTIVE_QUICK = [0.25, 0.5, 1.0], [0.5, 1.0]
OPTIMIZERS = {
    "kfac": (lambda lr, **options: keras_hoopt.KFAC(learning_rate=lr, **options), _ADAPTIVE_GRID, _ADAPTIVE_QUICK),
    "spngd": (lambda lr, **options: keras_hoopt.SPNGD(learning_rate=lr, **options), _ADAPTIVE_GRID, _ADAPTIVE_QUICK),
    # THOR's default frequency (100) suits ImageNet's 5,000 steps per epoch; these
    # workloads have 32, so statistics are refreshed every 20 steps.
    "thor": (
        lambda lr, **options: keras_hoopt.THOR(learning_rate=lr, frequency=20, **options),
        _ADAPTIVE_GRID,
        _ADAPTIVE_QUICK,
    ),
    # SPNGD's defaults with EKFAC's eigenbasis form (keras_hoopt.blocks.eigenbasis).
    "spngd_eigenbasis": (
        lambda lr, **options: keras_hoopt.SPNGD(
            learning_rate=lr, preconditioner="eigenbasis", name="spngd_eigenbasis", **options
        ),
        _ADAPTIVE_GRID,
        _ADAPTIVE_QUICK,
    ),
    # SPNGD's defaults with the exact Kronecker form everywhere (the default before "auto", which takes
    # the low-rank form on layers wide on both sides).
    "spngd_kronecker": (
        lambda lr, **options: keras_hoopt.SPNGD(
            learning_rate=lr, preconditioner="kronecker", name="spngd_kronecker", **options
        ),
        _ADAPTIVE_GRID,
        _ADAPTIVE_QUICK,
    ),
    # SPNGD's defaults with the low-rank form on factors of size >= 4 x 128 (keras_hoopt.blocks.low_rank).
    "spngd_low_rank": (
        lambda lr, **options: keras_hoopt.SPNGD(
            learning_rate=lr, preconditioner="low_rank", name="spngd_low_rank", **options
        ),
        _ADAPTIVE_GRID,
        _ADAPTIVE_QUICK,
    ),
    # SPNGD's defaults with the quadratic model's products in forward mode (the default before
    # central differences): the yardstick of what the differences save.
    "spngd_forward_mode": (
        lambda lr, **options: keras_hoopt.SPNGD(
            learning_rate=lr, quadratic_model_products="forward_mode", name="spngd_forward_mode", **options
        ),
        _ADAPTIVE_GRID,
        _ADAPTIVE_QUICK,
    ),
    # SPNGD's defaults with central differences (the default before one-sided differences, which
    # reuse the training pass's output): two more forward passes per step.
    "spngd_central": (
        lambda lr, **options: keras_hoopt.SPNGD(
            learning_rate=lr, quadratic_model_products="finite_differences", name="spngd_central", **options
        ),
        _ADAPTIVE_GRID,
        _ADAPTIVE_QUICK,
    ),
    # SPNGD's defaults with fresher statistics (similarity_threshold 0.03 instead of the paper's 0.1): on the text
    # workloads it reached Adam's best losses in fewer epochs (docs/benchmarks.md, "Fresher statistics on text").
    "spngd_similarity_003": (
        lambda lr, **options: keras_hoopt.SPNGD(
            learning_rate=lr, similarity_threshold=0.03, name="spngd_similarity_003", **options
        ),
        _ADAPTIVE_GRID,
        _ADAPTIVE_QUICK,
    ),
    # SPNGD's defaults with the quadratic model's curvature products measured in every step, as before
    # quadratic_model_interval=4 became the default (docs/benchmarks.md).
    "spngd_qm1": (
        lambda lr, **options: keras_hoopt.SPNGD(
            learning_rate=lr, quadratic_model_interval=1, name="spngd_qm1", **options
        ),
        _ADAPTIVE_GRID,
        _ADAPTIVE_QUICK,
    ),
    "spngd_fixed": (
        lambda lr, **options: keras_hoopt.SPNGD(
            learning_rate=lr, damping=1e-2, momentum=0.9, kl_clip=1e-3, step_size="fixed", name="spngd_fixed",
            **options,
        ),
        [0.1, 0.3, 1.0],
        [0.3, 1.0],
    ),
    "sgd": (
        lambda lr: keras.optimizers.SGD(learning_rate=lr, momentum=0.9),
        [0.03, 0.1, 0.3],
        [0.1, 0.3],
    ),
    "adam": (
        lambda lr: keras.optimizers.Adam(learning_rate=lr),
        [1e-3, 3e-3, 1e-2],
        [3e-3, 1e-2],
    ),
    "muon": (
        lambda lr: _MuonWithAdamWOutput(learning_rate=lr, name="muon"),
        [3e-3, 1e-2, 3e-2],
        [1e-2, 3e-2],
    ),
}
