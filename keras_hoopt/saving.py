"""Loading models saved with a keras_hoopt optimizer."""

import keras


def load_model(filepath, custom_objects=None, compile=True, safe_mode=True):
    """``keras.models.load_model`` with keras_hoopt's optimizers registered.

    The optimizer's curvature state (statistics, inverses, counters, momenta)
    is restored with the model, so ``fit`` continues on the same trajectory.
    Plain ``keras.models.load_model`` works the same once ``keras_hoopt`` is
    imported; this helper only guarantees the import.
    """
    return keras.models.load_model(
        filepath, custom_objects=custom_objects, compile=compile, safe_mode=safe_mode
    )
