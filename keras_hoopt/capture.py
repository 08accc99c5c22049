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


class LayerCall:
    """What one call of a supported layer recorded in a training forward pass.

    Attributes:
        inputs: the layer input tensor.
        extras: block-specific values (e.g. the BatchNorm mask and mode).
        output: the pre-activation output (watched by the Monte-Carlo tape).
        output_grad: ``dL/d output`` of the training loss, set by the backward
            pass (``None`` until then, or when the output did not reach the loss).
    """

    def __init__(self, record):
        self._record = record
        self.inputs = None
        self.extras = {}
        self.output = None
        self.output_grad = None

    def tap(self, output):
        """Route ``output`` through an identity that records its gradient."""
        self.output = output
        if self._record.tape is not None:
            self._record.tape.watch(output)

        @tf.custom_gradient
        def _identity(x):
            def grad(dy):
                self.output_grad = dy
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

    def new_call(self, layer):
        call = LayerCall(self)
        self.calls.setdefault(id(layer), []).append(call)
        return call

    def sampled_output_grads(self, calls):
        """Per-example gradients of the sampled-label loss w.r.t. each call's output."""
        outputs = [c.output for c in calls]
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
        self._layers = []
        self._installed = False

    # -- installation -------------------------------------------------------
    def install(self):
        if self._installed:
            return
        for layer in self.model._flatten_layers(include_self=False, recursive=True):
            block_type = self.block_types.get(id(layer))
            if block_type is not None:
                self._wrap(layer, self._layer_wrapper(layer, block_type))
        self._wrap(self.model, self._model_wrapper(self.model))
        self._installed = True

    def uninstall(self):
        for layer in self._layers:
            layer.__dict__.pop("call", None)
            layer.__dict__.pop("_keras_hoopt_session", None)
        self._layers = []
        self._records.clear()
        self._installed = False

    def _wrap(self, layer, wrapper):
        previous = layer.__dict__.get("_keras_hoopt_session")
        if previous is not None and previous is not self:
            previous.uninstall()
        object.__setattr__(layer, "call", wrapper)
        object.__setattr__(layer, "_keras_hoopt_session", self)
        self._layers.append(layer)

    def _layer_wrapper(self, layer, block_type):
        original = type(layer).call.__get__(layer)

        @functools.wraps(original)
        def call(*args, **kwargs):
            record = self.current_record()
            if record is None:
                return original(*args, **kwargs)
            return block_type.capture_call(layer, original, record.new_call(layer), *args, **kwargs)

        return call

    def _model_wrapper(self, model):
        original = type(model).call.__get__(model)

        @functools.wraps(original)
        def call(*args, **kwargs):
            if not _in_training_call():
                return original(*args, **kwargs)
            record = self._begin()
            if self.output_sampler is None:
                return original(*args, **kwargs)
            with tf.GradientTape(watch_accessed_variables=False, persistent=True) as tape:
                record.tape = tape
                outputs = original(*args, **kwargs)
                record.sampled_loss = self.output_sampler(outputs, self.seed_fn())
            record.tape = None
            record.sampled_tape = tape
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
        """The record of the training forward pass being traced, if any."""
        return self._lookup(pop=False)

    def pop_record(self):
        """Take the record of the current step (called by the optimizer)."""
        return self._lookup(pop=True)
