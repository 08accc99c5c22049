"""Interface of a refresh policy."""


class RefreshPolicy:
    """Decides, inside the train step, which statistics and inverses to recompute.

    The optimizer computes a block's statistics only inside a ``tf.cond`` on
    :meth:`statistics_due` and its inverses only inside a ``tf.cond`` on
    :meth:`inverses_due`, so work that is not due is not executed by the
    compiled step. Methods may return Python booleans (decided at trace time,
    no ``tf.cond`` is emitted) or scalar boolean tensors.
    """

    def statistics_due(self, step):
        raise NotImplementedError

    def inverses_due(self, step):
        raise NotImplementedError

    def get_config(self):
        return {}
