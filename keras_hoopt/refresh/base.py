"""Interface of a refresh policy: when statistics and inverses are recomputed."""

import tensorflow as tf

# Layout of each statistic's int64 counter vector (kept by the optimizer, read by policies).
REFRESHES, LAST_REFRESH, INVERSIONS, NONFINITE_SKIPS, FAILED_INVERSIONS = range(5)
NUM_COUNTERS = 5


def counter_fields(counters):
    """One statistic's counters as a list of :data:`NUM_COUNTERS` int64 scalars.

    A counter vector is unstacked once (one op) so that reading a field is a
    Python index, not a slice op per read; a list passes through.
    """
    if isinstance(counters, (list, tuple)):
        return list(counters)
    return tf.unstack(tf.convert_to_tensor(counters), num=NUM_COUNTERS)


class BlockView:
    """What a policy sees of one block in one step (all values are tensors).

    Attributes:
        index: position of the block in the optimizer's build order.
        block: the :class:`~keras_hoopt.blocks.CurvatureBlock`.
        names: its statistic names.
        counters: ``{name: counters}`` before this step's refresh, each
            indexed by :data:`REFRESHES`, :data:`LAST_REFRESH` ... of this
            module (in the train step the list of :func:`counter_fields`).
    """

    def __init__(self, index, block, names, counters):
        self.index, self.block, self.names, self.counters = index, block, names, counters


class RefreshPolicy:
    """Decides, inside the compiled train step, what to recompute.

    The optimizer computes a statistic only inside a ``tf.cond`` on its entry
    of :meth:`statistics_due`, and a block's inverses only inside a
    ``tf.cond`` on what :meth:`after_refresh` returns: work that is not due is
    not executed. Decisions may be Python booleans (decided when tracing, no
    ``tf.cond`` emitted) or scalar boolean tensors.

    A policy that keeps state creates its variables in :meth:`build` through
    ``optimizer.add_variable`` (in a fixed order, so ``.keras`` files restore
    it) and returns assignments from :meth:`after_refresh`, each
    ``(variable, new value)`` (written every step) or ``(variable, new value,
    when)`` (written only where the boolean ``when`` holds, so a large state
    that did not change is not copied); the optimizer writes them with its
    other state. Expensive work (norms of large statistics...) belongs in
    :meth:`measure_refresh`: it runs in every step otherwise.
    """

    def build(self, optimizer, views):
        """Create state variables; ``views`` lists one :class:`BlockView` per block."""

    def statistics_due(self, view, step):
        """``{name: bool}``: which of the block's statistics to recompute now."""
        raise NotImplementedError

    #: Length of the vector :meth:`measure_refresh` returns (0: the policy measures nothing).
    measurement_size = 0

    def measure_refresh(self, view, name, old, new):
        """A float32 vector (:attr:`measurement_size`) about one refresh of statistic ``name``.

        The optimizer runs it inside the ``tf.cond`` that folds the refreshed
        statistic, so its work (norms of large statistics) costs nothing, and
        adds no ``tf.cond`` of its own, in a step that does not refresh; the
        result reaches :meth:`after_refresh` as ``measured`` (zeros where the
        statistic was not refreshed).
        """
        raise NotImplementedError

    def after_refresh(self, view, old, new, refreshed, step, damping, measured=None):
        """Called every step after the statistics were folded in.

        Args:
            view: the block's :class:`BlockView`.
            old, new: ``{name: statistic}`` before and after this step.
            refreshed: ``{name: bool tensor}``: recomputed this step (and finite).
            step: the optimizer's iteration (before the increment).
            damping: the current damping.
            measured: ``{name: vector}`` of :meth:`measure_refresh` (a policy
                that measures computes it itself where this is None, as when
                driven outside the optimizer).

        Returns:
            ``(inverses_due, assignments)``: ``inverses_due`` is one boolean
            for the whole block or ``{name: boolean}`` per statistic.
        """
        raise NotImplementedError

    def statistics_due_together(self, views, step):
        """:meth:`statistics_due` of every view at once: a list of ``{name: bool}``, one per view.

        The step calls this one. By default it asks one view at a time; a
        policy whose decision is the same arithmetic for every statistic
        overrides it to decide all of them in one vectorised pass (a few ops
        in all instead of a few per statistic, traced and run every step).
        """
        return [self.statistics_due(view, step) for view in views]

    def after_refresh_together(self, views, old, new, refreshed, step, damping, measured=None):
        """:meth:`after_refresh` of every view at once.

        ``old``, ``new``, ``refreshed`` and ``measured`` map each view's
        ``index`` to what :meth:`after_refresh` takes for it (``measured``
        may be None). Returns ``(inverses_due, assignments)``: a list of each
        view's ``inverses_due`` and one list of assignments.
        """
        dues, assignments = [], []
        for view in views:
            b = view.index
            due, writes = self.after_refresh(
                view, old[b], new[b], refreshed[b], step, damping, measured[b] if measured is not None else None
            )
            dues.append(due)
            assignments.extend(writes)
        return dues, assignments

    def describe(self, view):
        """Extra per-layer entries for ``curvature_summary()`` (Python values)."""
        return {}

    def get_config(self):
        return {}
