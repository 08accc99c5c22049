"""Communication backends: how workers exchange gradients, statistics and inverses.

``communication=`` of every curvature optimizer takes one of :data:`CHOICES`:

* ``"auto"`` (default): ``tf.distribute`` when the model was built under a
  strategy with several replicas, Horovod when ``horovod.tensorflow`` is
  initialised with several processes, neither otherwise. Both at once is
  ambiguous and raises.
* ``"tf.distribute"``, ``"horovod"``, ``"none"``: that backend.

Adding a backend means one module with a :class:`Communicator` subclass and one
entry in :func:`make_communicator`.
"""

from keras_hoopt.communication.base import Collective, Communicator
from keras_hoopt.communication.horovod import HorovodCommunication, horovod_size
from keras_hoopt.communication.local import NoCommunication
from keras_hoopt.communication.tf_distribute import TFDistributeCommunication

CHOICES = ("auto", "tf.distribute", "horovod", "none")

__all__ = [
    "CHOICES",
    "Collective",
    "Communicator",
    "HorovodCommunication",
    "NoCommunication",
    "TFDistributeCommunication",
    "make_communicator",
]


def make_communicator(communication, strategy):
    """The backend for ``communication`` (one of :data:`CHOICES`) and the model's strategy."""
    replicas = int(strategy.num_replicas_in_sync) if strategy is not None else 1
    if communication == "auto":
        processes = horovod_size() or 1
        if replicas > 1 and processes > 1:
            raise ValueError(
                "communication='auto' is ambiguous: the model runs under a tf.distribute strategy "
                f"with {replicas} replicas and Horovod is initialised with {processes} processes. "
                "Pass communication='tf.distribute' or communication='horovod'."
            )
        if replicas > 1:
            return TFDistributeCommunication(strategy)
        if processes > 1:
            return HorovodCommunication()
        return NoCommunication()
    if communication == "tf.distribute":
        if replicas == 1:
            return NoCommunication()
        return TFDistributeCommunication(strategy)
    if communication == "horovod":
        if replicas > 1:
            raise ValueError(
                "communication='horovod' with a tf.distribute strategy of several replicas would "
                "reduce twice; use one or the other."
            )
        return HorovodCommunication()
    if communication == "none":
        return NoCommunication()
    raise ValueError(f"communication must be one of {', '.join(map(repr, CHOICES))}; got {communication!r}.")
