"""One worker of tests/test_distributed.py: train, checkpoint, resume; write what the test compares.

Usage: ``python tests/_distributed_worker.py LAUNCH OUT_DIR [RESUME_DIR ...]`` where LAUNCH is

* ``single``: one process, one device: the reference. It also resumes every checkpoint found in
  the RESUME_DIRs (written by rank 0 of a 2-worker launch) on this one worker;
* ``mirrored``: MirroredStrategy over 2 logical CPU devices of this process;
* ``multiworker``: one of 2 MultiWorkerMirroredStrategy processes (TF_CONFIG set by the test);
* ``horovod``: one of the processes of ``horovodrun -np 2 --gloo -H localhost:2``.

For each configuration in CONFIGS every launch trains STEPS steps of a global batch of BATCH
examples (each worker takes its contiguous part of every global batch), saves the weights and
the full optimizer state, lets rank 0 write a ``.keras`` checkpoint, trains MORE steps
("continued"), and then every worker loads rank 0's checkpoint into a fresh model and trains the
same MORE steps ("resumed"). Each worker writes ``{launch}_rank{r}.npz`` and a JSON line.
"""

import contextlib
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

LAUNCH, OUT = sys.argv[1], sys.argv[2]
RESUME_DIRS = sys.argv[3:]
if LAUNCH == "mirrored":
    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

import keras_hoopt  # noqa: E402

BATCH, STEPS, MORE = 32, 4, 3
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def make_optimizer(config):
    # The empirical Fisher: a single process cannot draw the Monte-Carlo labels two workers draw.
    common = dict(learning_rate=0.05, damping=1e-2, kl_clip=1e-2, momentum=0.9, factor_decay=0.5, fisher="empirical")
    if config == "kfac_inverses":
        # Central differences for the quadratic model: with the default one-sided ones (a 14x smaller
        # step, so 14x more of the rounding that differs between one process's batch and two workers'
        # halves) this config's weights agree to ~1e-4 across worker counts, not the 1e-5 held here;
        # the other configs hold 1e-5 with the default.
        return keras_hoopt.KFAC(inverse_update_interval=2, model_parallel="inverses",
                                quadratic_model_products="finite_differences", **common)
    if config == "spngd_gradients":
        # threshold 0.5: intervals grow within the run, so steps without a refresh occur.
        return keras_hoopt.SPNGD(similarity_threshold=0.5, model_parallel="gradients", **common)
    if config == "ekfac_inverses":  # the eigenbasis's running diagonal is averaged over workers
        return keras_hoopt.KFAC(inverse_update_interval=2, model_parallel="inverses", preconditioner="eigenbasis",
                                **common)
    if config == "lowrank_gradients":
        # rank 2: the factors of size >= 8 (conv's A, hidden's A and G, hidden2's A) are low rank, the
        # others exact; every worker draws the same range-finder sketch.
        return keras_hoopt.SPNGD(similarity_threshold=0.5, model_parallel="gradients", preconditioner="low_rank",
                                 preconditioner_rank=2, **common)
    raise ValueError(config)


CONFIGS = ("kfac_inverses", "spngd_gradients", "ekfac_inverses", "lowrank_gradients")


def build_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(4, 3, activation="tanh", name="conv"),
        keras.layers.Flatten(),
        keras.layers.Dense(12, activation="tanh", name="hidden"),
        keras.layers.Dense(8, activation="tanh", name="hidden2"),
        keras.layers.Dense(3, name="logits"),
    ])


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * (STEPS + MORE), 6, 6, 2)).astype("float32")
    y = ((x[:, :3].mean(axis=(1, 2, 3)) > 0).astype("int32") + (x[:, 3:].mean(axis=(1, 2, 3)) > 0)).astype("int32")
    return x, y


class Launch:
    """What differs between launches: strategy, rank, how a worker's data is cut."""

    def __init__(self, kind):
        self.kind, self.strategy, self.rank, self.size = kind, None, 0, 1
        if kind == "mirrored":
            self.strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        elif kind == "multiworker":
            self.strategy = tf.distribute.MultiWorkerMirroredStrategy()
            self.rank = self.strategy.cluster_resolver.task_id
            self.size = self.strategy.num_replicas_in_sync
        elif kind == "horovod":
            import horovod.tensorflow as hvd

            hvd.init()
            self.hvd, self.rank, self.size = hvd, hvd.rank(), hvd.size()

    def scope(self):
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def fit(self, model, first_step, steps, callbacks=()):
        x, y = data()
        rows = slice(first_step * BATCH, (first_step + steps) * BATCH)
        x, y = x[rows], y[rows]
        if self.kind == "horovod":
            # each process: its contiguous share of every global batch
            share = BATCH // self.size
            index = np.concatenate([
                np.arange(s * BATCH + self.rank * share, s * BATCH + (self.rank + 1) * share) for s in range(steps)
            ])
            model.fit(x[index], y[index], batch_size=share, epochs=1, shuffle=False, verbose=0,
                      callbacks=list(callbacks))
            return
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        model.fit(dataset.with_options(options), epochs=1, verbose=0, callbacks=list(callbacks))

    def local_inversions(self, optimizer):
        return self.per_replica(optimizer._attachment.local_inversions)

    def per_replica(self, counts):
        if self.strategy is not None:
            return [v.numpy() for v in self.strategy.experimental_local_results(counts)]
        return [counts.numpy()]


def state(optimizer):
    return {v.path: np.array(v.numpy()) for v in optimizer.variables}


def record(arrays, prefix, model, optimizer):
    for i, w in enumerate(model.weights):
        arrays[f"{prefix}/weight/{i}"] = w.numpy()
    if optimizer is not None:
        for path, value in state(optimizer).items():
            arrays[f"{prefix}/state/{path}"] = value


def progress(launch, *what):
    if os.environ.get("KERAS_HOOPT_TEST_PROGRESS"):
        print(f"[{LAUNCH} {launch.rank}]", *what, file=sys.stderr, flush=True)


def main():
    if os.environ.get("KERAS_HOOPT_TEST_PROGRESS"):
        import faulthandler

        faulthandler.dump_traceback_later(60, exit=True)
    launch = Launch(LAUNCH)
    arrays, info = {}, {"rank": launch.rank, "size": launch.size, "configs": {}}
    callbacks = [keras_hoopt.callbacks.BroadcastGlobalVariables(0)] if LAUNCH == "horovod" else []
    for config in CONFIGS:
        with launch.scope():
            model = build_model()
            if LAUNCH == "horovod" and launch.rank != 0:
                # different initial weights on purpose: the broadcast callback must fix them
                for w in model.weights:
                    w.assign(w.numpy() + 1.0)
            optimizer = make_optimizer(config)
            model.compile(optimizer=optimizer, loss=LOSS, jit_compile=False)
        progress(launch, config, "train")
        launch.fit(model, 0, STEPS, callbacks)
        progress(launch, config, "trained")
        record(arrays, f"{config}/trained", model, optimizer)
        inv = launch.local_inversions(optimizer)
        for replica, counts in enumerate(inv):
            arrays[f"{config}/local_inversions/{replica}"] = counts
        for replica, sent in enumerate(launch.per_replica(optimizer._attachment.bytes_sent)):
            arrays[f"{config}/bytes_sent/{replica}"] = sent
        arrays[f"{config}/communication"] = np.array(json.dumps(optimizer.communication_summary()))
        checkpoint = os.path.join(OUT, f"{LAUNCH}_{config}.keras")
        if launch.rank == 0:
            model.save(checkpoint)
        info["configs"][config] = {
            "mode": optimizer._attachment.mode,
            "model_parallel": optimizer.model_parallel,
            "owners": optimizer._attachment.owners,
            "communicator": optimizer._attachment.communicator.describe(),
            "plan": [c.as_dict() for c in optimizer._attachment.communicator.plan],
            "summary": optimizer.curvature_summary(),
            "slots": [[b.name, n] for b, _, names in optimizer._attachment.blocks for n in names],
            # the variables of every factor's preconditioner state, whatever its form's layout
            "preconditioner_state": sorted(v.path for parts in optimizer._preconditioners for v in parts.values()),
        }
        launch.fit(model, STEPS, MORE)
        progress(launch, config, "continued")
        record(arrays, f"{config}/continued", model, None)
        barrier(launch)
        with launch.scope():
            resumed = keras_hoopt.load_model(checkpoint)
        progress(launch, config, "loaded")
        launch.fit(resumed, STEPS, MORE)
        progress(launch, config, "resumed")
        record(arrays, f"{config}/resumed", resumed, None)
        barrier(launch)
        keras.backend.clear_session()
    if LAUNCH == "single":
        for directory in RESUME_DIRS:
            for name in sorted(os.listdir(directory)):
                if not name.endswith(".keras"):
                    continue
                model = keras_hoopt.load_model(os.path.join(directory, name))
                launch.fit(model, STEPS, MORE)
                record(arrays, f"from/{name[:-len('.keras')]}", model, None)
                keras.backend.clear_session()
    np.savez(os.path.join(OUT, f"{LAUNCH}_rank{launch.rank}.npz"), **arrays)
    print(json.dumps(info))


def barrier(launch):
    """Rank 0 has written its checkpoint before anyone reads it."""
    if launch.kind == "horovod":
        launch.hvd.allreduce(tf.constant(0.0), name="barrier")
    elif launch.kind == "multiworker":
        launch.strategy.reduce("SUM", launch.strategy.run(lambda: tf.constant(0.0)), axis=None)


if __name__ == "__main__":
    main()
