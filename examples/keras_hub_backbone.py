"""Train a KerasHub GPT-2 model, built from a config (no preset, no download), with SP-NGD.

    python examples/keras_hub_backbone.py                        # SP-NGD, 60 steps on CPython's docs
    python examples/keras_hub_backbone.py --optimizer kfac       # K-FAC (also: thor, adam)
    python examples/keras_hub_backbone.py --layers 4 --hidden 128 --steps 200
    python examples/keras_hub_backbone.py --epochs 1 --steps 5   # smoke run

``keras_hub.models.GPT2Backbone`` with a small configuration (2 decoder layers, 2 heads, width
64, MLP width 128, 64 positions) and randomly initialised weights, wrapped in
``keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)``: the output logits reuse the
token embedding (``ReversibleEmbedding``, tied weights). It is trained as a character language
model on the text CPython ships in ``pydoc_data/topics.py`` (``keras_hoopt.datasets.load_pydoc_text``:
windows of 64 characters, 97 character ids, the last 10% of the text held out), so nothing is
downloaded: the vocabulary is the characters, not GPT-2's tokenizer, and no preset is loaded.

Prints the train loss, the held-out loss, and what the curvature optimizer preconditions: one
line per curvature block (kind, refreshes, inversions) and the layers left to its first-order
fallback update (KerasHub's PositionEmbedding, and whatever has no block in this install).
"""

import argparse
import collections
import math
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_hoopt  # noqa: E402

SEQUENCE_LENGTH = 64
STRIDE = 128  # training windows start every 128 characters (3,270 windows)
LEARNING_RATES = {"kfac": 0.3, "spngd": 0.3, "thor": 0.3, "adam": 3e-3}


def build_model(vocabulary_size, num_layers=2, num_heads=2, hidden_dim=64, intermediate_dim=128, dropout=0.0):
    import keras_hub

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=vocabulary_size,
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_dim=hidden_dim,
        intermediate_dim=intermediate_dim,
        dropout=dropout,
        max_sequence_length=SEQUENCE_LENGTH,
    )
    return keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)


def make_optimizer(name, learning_rate, steps_per_epoch):
    if name == "adam":
        return keras.optimizers.Adam(learning_rate)
    common = dict(learning_rate=learning_rate, damping=1e-2, kl_clip=1e-3, momentum=0.9, step_size="fixed")
    if name == "kfac":
        return keras_hoopt.KFAC(**common)
    if name == "spngd":
        return keras_hoopt.SPNGD(**common)
    # THOR's default frequency (100) is for 5,000-step ImageNet epochs; refresh at least once an epoch here.
    return keras_hoopt.THOR(frequency=max(1, min(20, steps_per_epoch)), **common)


def backbone_inputs(token_ids):
    """What a GPT2Backbone takes: token ids and a padding mask (every position is a real character)."""
    return {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", choices=sorted(LEARNING_RATES), default="spngd")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=60, help="steps per epoch (at most the 204 batches of 16)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="default: " + ", ".join(f"{k} {v:g}" for k, v in sorted(LEARNING_RATES.items())))
    parser.add_argument("--layers", type=int, default=2, help="decoder layers")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64, help="hidden_dim")
    parser.add_argument("--intermediate", type=int, default=128, help="intermediate_dim (MLP width)")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    learning_rate = LEARNING_RATES[args.optimizer] if args.learning_rate is None else args.learning_rate

    keras.utils.set_random_seed(args.seed)
    (x, y), (x_test, y_test) = keras_hoopt.datasets.load_pydoc_text(sequence_length=SEQUENCE_LENGTH, stride=STRIDE)
    vocabulary_size = len(keras_hoopt.datasets.PYDOC_VOCABULARY)
    batches = math.ceil(len(x) / args.batch_size)
    steps_per_epoch = min(args.steps or batches, batches)
    model = build_model(vocabulary_size, args.layers, args.heads, args.hidden, args.intermediate, args.dropout)
    optimizer = make_optimizer(args.optimizer, learning_rate, steps_per_epoch)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  weighted_metrics=[])

    print(f"{type(model).__name__}({type(model.backbone).__name__}: {args.layers} layers, {args.heads} heads, "
          f"hidden {args.hidden}, intermediate {args.intermediate}), vocabulary {vocabulary_size}, "
          f"{model.count_params():,} parameters, random initialisation")
    print(f"{args.optimizer}: learning rate {learning_rate:g}, batch {args.batch_size}, {steps_per_epoch} steps/epoch")
    start, first = time.time(), []
    log = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: first.append(logs["loss"]) if not first else None,
        on_epoch_end=lambda epoch, logs: print(
            f"epoch {epoch + 1}/{args.epochs}: train loss {logs['loss']:.4f} ({time.time() - start:.0f} s)",
            flush=True))
    model.fit(backbone_inputs(x), y, batch_size=args.batch_size, epochs=args.epochs, steps_per_epoch=steps_per_epoch,
              callbacks=[log], verbose=0)
    test_loss = float(model.evaluate(backbone_inputs(x_test), y_test, batch_size=256, verbose=0))
    print(f"first batch loss {first[0]:.4f} (uniform over the vocabulary: {math.log(vocabulary_size):.4f}), "
          f"held-out loss {test_loss:.4f} nats/char")
    if hasattr(optimizer, "curvature_summary"):
        rows = optimizer.curvature_summary()
        kinds = collections.Counter(row["kind"] for row in rows)
        print(f"{len(rows)} curvature blocks: " + ", ".join(f"{kind} x{n}" for kind, n in sorted(kinds.items())))
        for row in rows:
            print(f"  {row['layer']:<32} {row['kind']:<20} refreshes {row['refreshes']} "
                  f"inversions {row['inversions']}")
        if hasattr(optimizer, "coverage_summary"):
            coverage = optimizer.coverage_summary()
            uncovered = sorted({path.rsplit("/", 1)[0] for path in coverage["uncovered"]})
            print(f"preconditioned {coverage['preconditioned']:,} of {coverage['parameters']:,} parameters "
                  f"({100 * coverage['share']:.0f}%); first-order fallback: {', '.join(uncovered) or 'none'}")
    return model


if __name__ == "__main__":
    main()
