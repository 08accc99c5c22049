"""Capture of layer inputs and output gradients from the training pass.

K-FAC needs, for every supported layer, the layer input ``a`` of the forward
pass and the gradient ``dy`` of the loss with respect to the layer output
(pre-activation) of the *same* backward pass. Keras hands an optimizer neither,
so :class:`CaptureSession` installs small per-instance wrappers:

* each supported layer's ``call`` is replaced (on the instance, not the class)
  by a wrapper that lets the layer's curvature block run the forward pass and
  records what the block needs; the pre-activation goes through an identity
  whose custom gradient records ``dy``;
* the compiled model's own ``call`` is wrapped so that every *training* forward
  pass opens a fresh :class:`ForwardRecord` (and, for the Monte-Carlo Fisher,
  a gradient tape that sees the model output).

A layer shared by several compiled models keeps one wrapper that records
into every session installed on it; only the session of the model whose
training pass is running has a record to fill, so each model's optimizer
gets its own batches. A model has one session: installing a new one (or the
exact optimizers' batch recorder) uninstalls the previous one.

Records are keyed by ``(graph, replica id)``: every trace of the train step has
its own ``FuncGraph``, and under ``tf.distribute`` each replica traces the step
in its own thread. The optimizer pops the record of its own graph (walking up
``outer_graph`` from inside ``tf.cond``/``tf.while_loop`` bodies) in the same
step. Nothing is recorded outside a training forward pass (``evaluate``,
``predict`` and inference calls run the original layer code).
"""

import functools
import threading
import weakref

import tensorflow as tf
from keras.src.backend.common import global_state

_EAGER = "eager"
_MODEL_SESSION = "_keras_hoopt_session"  # the compiled model's capture (or exact batch recorder)
_LAYER_SESSIONS = "_keras_hoopt_sessions"  # every capture session a layer records into
OUTPUT = "output"  # the tap of a layer's pre-activation output


def current_graph_chain():
    """The current graph and its outer graphs, innermost first."""
    if tf.executing_eagerly():
        return [_EAGER]
    chain = []
    graph = tf.compat.v1.get_default_graph()
    while graph is not None:
        chain.append(graph)
        graph = getattr(graph, "outer_graph", None)
    return chain


def replica_id():
    """The replica id of the current tf.distribute replica context (0 if none)."""
    context = tf.distribute.get_replica_context()
    if context is None:
        return 0
    value = getattr(context, "_replica_id_in_sync_group", 0)
    static = tf.get_static_value(value)
    return 0 if static is None else int(static)


def _in_training_call():
    context = global_state.get_global_attribute("current_call_ctx")
    if context is None:
        return False
    training = context.get_value("training")
    if training is None:
        return False
    static = tf.get_static_value(training) if tf.is_tensor(training) else training
    return bool(static) if static is not None else True


def _shared_layer_call(layer, sessions, block_type):
    """The per-instance ``call`` of a captured layer: records into every session that is tracing.

    Only the session of the model in a training forward pass has a current
    record; with nested compiled models several may, and they share one
    :class:`LayerCall` (the layer runs once).
    """
    original = type(layer).call.__get__(layer)

    @functools.wraps(original)
    def call(*args, **kwargs):
        records = [r for r in (s.current_record() for s in list(sessions)) if r is not None]
        if not records:
            return original(*args, **kwargs)
        layer_call = records[0].new_call(layer)
        for other in records[1:]:
            other.calls.setdefault(id(layer), []).append(layer_call)
        return block_type.capture_call(layer, original, layer_call, *args, **kwargs)

    return call


class LayerCall:
    """What one call of a supported layer recorded in a training forward pass.

    Attributes:
        inputs: the layer input tensor.
        extras: block-specific values (e.g. the BatchNorm mask and mode).
        outputs: ``{tap name: tensor}`` of the tapped tensors (the
            pre-activation output is tap ``"output"``; a block may tap more,
            e.g. a separable convolution its depthwise result); the
            Monte-Carlo tape watches each.
        output_grads: ``{tap name: dL/d tensor}`` of the training loss, set by
            the backward pass (absent until then, or when the tensor did not
            reach the loss).
        output, output_grad: tap ``"output"`` (``None`` when absent).
    """

    def __init__(self, record):
        self._record = record
        self.inputs = None
        self.extras = {}
        self.outputs = {}
        self.output_grads = {}

    @property
    def output(self):
        return self.outputs.get(OUTPUT)

    @property
    def output_grad(self):
        return self.output_grads.get(OUTPUT)

    @property
    def complete(self):
        """Whether the inputs and the gradient of every tap were recorded."""
        return self.inputs is not None and bool(self.outputs) and all(
            name in self.output_grads for name in self.outputs
        )

    def tap(self, output, name=OUTPUT):
        """Route ``output`` through an identity that records its gradient as tap ``name``."""
        self.outputs[name] = output
        if self._record.tape is not None:
            self._record.tape.watch(output)

        @tf.custom_gradient
        def _identity(x):
            def grad(dy):
                self.output_grads[name] = dy
                return dy

            return tf.identity(x), grad

        return _identity(output)


class ForwardRecord:
    """Every supported layer's calls in one training forward pass."""

    def __init__(self):
        self.calls = {}  # id(layer) -> [LayerCall]
        self.tape = None  # active Monte-Carlo tape during the forward pass
        self.sampled_tape = None  # finished Monte-Carlo tape
        self.sampled_loss = None  # sum over examples of the sampled-label loss
        self.model_call = None  # (args, kwargs) of the model's training call (re-run by the quadratic model)
        self.model_output = None  # what that call returned (the quadratic model's f(theta), where reproducible)
        self.added_losses = None  # whether a layer added a loss in that call (activity regulariser, add_loss)
        self.data = None  # the batch ``train_step`` received (x, y, sample_weight), if it ran

    def new_call(self, layer):
        call = LayerCall(self)
        self.calls.setdefault(id(layer), []).append(call)
        return call

    def sampled_output_grads(self, calls, name=OUTPUT):
        """Per-example gradients of the sampled-label loss w.r.t. each call's tap ``name``."""
        outputs = [c.outputs[name] for c in calls]
        return self.sampled_tape.gradient(self.sampled_loss, outputs)


class CaptureSession:
    """Installs capture wrappers on a model and hands records to the optimizer.

    Args:
        model: the Keras model whose training passes are captured.
        block_types: ``{id(layer): block class}`` for the layers to capture.
        output_sampler: ``None`` (empirical Fisher) or a callable
            ``(y_pred, seed) -> scalar loss`` with labels sampled from the
            model's predictive distribution (Monte-Carlo Fisher).
        seed_fn: callable returning a stateless seed tensor for the sampler.
    """

    def __init__(self, model, block_types, output_sampler=None, seed_fn=None):
        self.model = model
        self.block_types = dict(block_types)
        self.output_sampler = output_sampler
        self.seed_fn = seed_fn
        self._records = {}
        self._lock = threading.Lock()
        self._local = threading.local()  # per thread (tf.distribute replica): inside train_step?
        self._layers = []
        self._installed = False

    # -- installation -------------------------------------------------------
    def install(self):
        if self._installed:
            return
        previous = self.model.__dict__.get(_MODEL_SESSION)
        if previous is not None and previous is not self:
            previous.uninstall()  # one capture (or batch recorder) per compiled model
        for layer in self.model._flatten_layers(include_self=False, recursive=True):
            if id(layer) in self.block_types:
                self._join(layer)
        object.__setattr__(self.model, "call", self._model_wrapper(self.model))
        object.__setattr__(self.model, "train_step", self._train_step_wrapper(self.model))
        object.__setattr__(self.model, _MODEL_SESSION, self)
        self._installed = True

    def uninstall(self):
        for layer in self._layers:
            sessions = layer.__dict__.get(_LAYER_SESSIONS, [])
            if self in sessions:
                sessions.remove(self)
            if not sessions:
                layer.__dict__.pop("call", None)
                layer.__dict__.pop(_LAYER_SESSIONS, None)
        self._layers = []
        if self.model.__dict__.get(_MODEL_SESSION) is self:
            self.model.__dict__.pop("call", None)
            self.model.__dict__.pop("train_step", None)
            self.model.__dict__.pop(_MODEL_SESSION, None)
        self._records.clear()
        self._installed = False

    def _join(self, layer):
        """Add this session to ``layer``'s capture, installing the layer's wrapper if it has none.

        A layer shared by several compiled models is captured by every
        model's session: each training pass records into the session of the
        model being trained (see :func:`_shared_layer_call`).
        """
        sessions = layer.__dict__.get(_LAYER_SESSIONS)
        if sessions is None:
            sessions = []
            object.__setattr__(layer, _LAYER_SESSIONS, sessions)
            object.__setattr__(layer, "call", _shared_layer_call(layer, sessions, self.block_types[id(layer)]))
        sessions.append(self)
        self._layers.append(layer)

    def _train_step_wrapper(self, model):
        """``train_step`` marks its thread as training: a model whose ``call`` takes no
        ``training`` argument is called by Keras without one, yet that pass is training."""
        original = type(model).train_step.__get__(model)

        @functools.wraps(original)
        def train_step(*args, **kwargs):
            before = getattr(self._local, "in_train_step", False), getattr(self._local, "data", None)
            self._local.in_train_step = True
            self._local.data = args[0] if args else kwargs.get("data")
            try:
                return original(*args, **kwargs)
            finally:
                self._local.in_train_step, self._local.data = before

        return train_step

    def _is_training_pass(self, model):
        if getattr(self._local, "paused", False):
            return False
        if _in_training_call():
            return True
        return not model._call_has_training_arg and getattr(self._local, "in_train_step", False)

    def _model_wrapper(self, model):
        original = type(model).call.__get__(model)

        @functools.wraps(original)
        def call(*args, **kwargs):
            if not self._is_training_pass(model):
                return original(*args, **kwargs)
            record = self._begin()
            record.model_call = (args, kwargs)
            record.data = getattr(self._local, "data", None)
            if self.output_sampler is None:
                outputs = original(*args, **kwargs)
            else:
                with tf.GradientTape(watch_accessed_variables=False, persistent=True) as tape:
                    record.tape = tape
                    outputs = original(*args, **kwargs)
                    record.sampled_loss = self.output_sampler(outputs, self.seed_fn())
                record.tape = None
                record.sampled_tape = tape
            record.model_output = outputs
            # Read now: the next call of the model (a re-run) clears the layers' losses.
            record.added_losses = any(getattr(layer, "_losses", None) for layer in model._flatten_layers())
            return outputs

        return call

    # -- records ------------------------------------------------------------
    def _key(self, graph):
        return (graph if graph is _EAGER else weakref.ref(graph), replica_id())

    def _begin(self):
        record = ForwardRecord()
        key = self._key(current_graph_chain()[0])
        with self._lock:
            self._drop_dead_graphs()
            self._records[key] = record
        return record

    def _drop_dead_graphs(self):
        for key in [k for k in self._records if k[0] is not _EAGER and k[0]() is None]:
            del self._records[key]

    def _lookup(self, pop):
        with self._lock:
            for graph in current_graph_chain():
                key = self._key(graph)
                if key in self._records:
                    return self._records.pop(key) if pop else self._records[key]
        return None

    def current_record(self):
        """The record of the training forward pass being traced, if any (none while paused)."""
        if getattr(self._local, "paused", False):
            return None
        return self._lookup(pop=False)

    def rerun(self, args, kwargs):
        """The model called on what its recorded ``call`` received, recording nothing (the
        optimizer's re-run of the training forward pass, e.g. for curvature-vector products)."""
        before = getattr(self._local, "paused", False)
        self._local.paused = True
        try:
            return self.model(*args, **kwargs)
        finally:
            self._local.paused = before

    def pop_record(self):
        """Take the record of the current step (called by the optimizer)."""
        return self._lookup(pop=True)
