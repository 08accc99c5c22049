"""Model-parallel inversion: which worker inverts which layer.

Each worker owns a share of the curvature blocks, balanced greedily by
inversion cost (longest processing time first: the most expensive block goes
to the least-loaded worker). The assignment is a pure function of the block
shapes and the number of workers, so every worker computes the same one
without communicating.
"""

import math

MODEL_PARALLEL_MODES = ("auto", "off", "inverses", "gradients")


def inversion_cost(statistic_shapes, split_dim=None):
    """Flops-like cost ``sum n^3`` of inverting a block's statistics (batched and split aware)."""
    cost = 0
    for shape in statistic_shapes.values():
        shape = tuple(int(d) for d in shape)
        n = shape[-1]
        if len(shape) == 1:  # a diagonal: n reciprocals
            cost += n
            continue
        batch = math.prod(shape[:-2]) if len(shape) > 2 else 1
        if split_dim is not None and n > split_dim:
            pieces, last = divmod(n, split_dim)
            cost += batch * (pieces * split_dim**3 + last**3)
        else:
            cost += batch * n**3
    return cost


def assign_owners(costs, num_workers):
    """Owner (worker index) of each block: greedy by cost, ties to the lower index."""
    loads = [0] * num_workers
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        worker = min(range(num_workers), key=lambda w: (loads[w], w))
        owners[index] = worker
        loads[worker] += costs[index]
    return owners


def resolve_mode(model_parallel, num_workers, conditional_collectives):
    """The effective mode: ``"off"`` on one worker; ``"auto"`` picks by backend.

    ``"auto"`` is ``"inverses"`` where collectives can be skipped in steps
    without a refresh (Horovod): the inverses travel only when recomputed.
    Otherwise (``tf.distribute``) every collective runs every step, and
    sending preconditioned gradients (``"gradients"``, the size of the
    gradients) costs less than sending every inverse every step.
    """
    if num_workers == 1:
        return "off"
    if model_parallel == "auto":
        return "inverses" if conditional_collectives else "gradients"
    return model_parallel
