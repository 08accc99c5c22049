"""Train a small causal transformer character language model on CPython's own documentation.

    python examples/small_transformer.py                        # SP-NGD, 10 epochs (no download)
    python examples/small_transformer.py --optimizer kfac       # K-FAC (also: thor)
    python examples/small_transformer.py --optimizer adam       # first-order baseline
    python examples/small_transformer.py --epochs 1 --steps 5   # smoke run

The text is the ~465,000 characters of English that CPython ships in ``pydoc_data/topics.py``
(what ``help("if")`` prints), read by ``keras_hoopt.datasets.load_pydoc_text``: windows of 64
characters and their next characters, 97 character ids, the last 10% of the text held out. The
model is a GPT-style decoder built from stock Keras layers: token and learned position
embeddings, two pre-norm blocks (causal multi-head self-attention, then a GELU MLP, each with a
residual connection), a final LayerNormalization and a Dense layer to the next-character logits.

Prints the train loss per epoch, the held-out loss in nats and bits per character next to the
loss of predicting the training text's character frequencies (the level to beat), and which
layers the curvature optimizer preconditions (the others get its first-order fallback update).
"""

import argparse
import collections
import math
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

import keras_hoopt  # noqa: E402

SEQUENCE_LENGTH = 64
# Training windows start every 128 characters (3,270 windows); the test windows are adjacent.
STRIDE = 128

# Default learning rate per optimizer (the curvature optimizers with damping 1e-2, kl_clip 1e-3,
# momentum 0.9): SPNGD's and Adam's tried on this model with batch 32 (3 epochs: held-out loss 1.88
# and 1.89); K-FAC and THOR take SPNGD's.
LEARNING_RATES = {"kfac": 0.3, "spngd": 0.3, "thor": 0.3, "adam": 3e-3}


def build_model(vocabulary_size, sequence_length=SEQUENCE_LENGTH, width=64, num_heads=2, num_blocks=2,
                mlp_width=256):
    tokens = keras.Input((sequence_length,), dtype="int32", name="tokens")
    positions = ops.cumsum(ops.ones_like(tokens), axis=1) - 1  # 0, 1, ..., T - 1 in every row
    x = keras.layers.Embedding(vocabulary_size, width, name="token_embedding")(tokens)
    x = x + keras.layers.Embedding(sequence_length, width, name="position_embedding")(positions)
    for block in range(num_blocks):
        h = keras.layers.LayerNormalization(epsilon=1e-5, name=f"block{block}_attention_norm")(x)
        h = keras.layers.MultiHeadAttention(num_heads, width // num_heads, name=f"block{block}_attention")(
            h, h, use_causal_mask=True)
        x = x + h
        h = keras.layers.LayerNormalization(epsilon=1e-5, name=f"block{block}_mlp_norm")(x)
        h = keras.layers.Dense(mlp_width, activation="gelu", name=f"block{block}_mlp_in")(h)
        x = x + keras.layers.Dense(width, name=f"block{block}_mlp_out")(h)
    x = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")(x)
    logits = keras.layers.Dense(vocabulary_size, name="logits")(x)
    return keras.Model(tokens, logits, name="small_transformer")


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


def unigram_loss(train_ids, test_ids, vocabulary_size):
    """Held-out cross-entropy (nats/character) of the training text's character frequencies (add-one)."""
    counts = np.bincount(np.reshape(train_ids, -1), minlength=vocabulary_size) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(-log_p[np.reshape(test_ids, -1)].mean())


def report_curvature(optimizer):
    """The layers the optimizer preconditions, by kind, and the share of the parameters they hold."""
    rows = optimizer.curvature_summary()
    kinds = collections.Counter(row["kind"] for row in rows)
    print(f"{len(rows)} curvature blocks: " + ", ".join(f"{kind} x{n}" for kind, n in sorted(kinds.items())))
    for row in rows:
        print(f"  {row['layer']:<28} {row['kind']:<20} refreshes {row['refreshes']} inversions {row['inversions']}")
    if hasattr(optimizer, "coverage_summary"):
        coverage = optimizer.coverage_summary()
        uncovered = sorted({path.rsplit("/", 1)[0] for path in coverage["uncovered"]})
        print(f"preconditioned {coverage['preconditioned']:,} of {coverage['parameters']:,} parameters "
              f"({100 * coverage['share']:.0f}%); first-order fallback: {', '.join(uncovered) or 'none'}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", choices=sorted(LEARNING_RATES), default="spngd")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=None, help="steps per epoch (default: the whole training set)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="default: " + ", ".join(f"{k} {v:g}" for k, v in sorted(LEARNING_RATES.items())))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    learning_rate = LEARNING_RATES[args.optimizer] if args.learning_rate is None else args.learning_rate

    keras.utils.set_random_seed(args.seed)
    (x, y), (x_test, y_test) = keras_hoopt.datasets.load_pydoc_text(sequence_length=SEQUENCE_LENGTH, stride=STRIDE)
    vocabulary_size = len(keras_hoopt.datasets.PYDOC_VOCABULARY)
    steps_per_epoch = args.steps or math.ceil(len(x) / args.batch_size)
    model = build_model(vocabulary_size)
    optimizer = make_optimizer(args.optimizer, learning_rate, steps_per_epoch)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    print(f"pydoc text: {len(x)} training windows, {len(x_test)} test windows of {SEQUENCE_LENGTH} characters, "
          f"vocabulary {vocabulary_size}")
    print(f"{args.optimizer}: learning rate {learning_rate:g}, batch {args.batch_size}, {steps_per_epoch} steps/epoch, "
          f"{model.count_params():,} parameters")
    start = time.time()
    log = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: print(
        f"epoch {epoch + 1}/{args.epochs}: train loss {logs['loss']:.4f} ({time.time() - start:.0f} s)", flush=True))
    model.fit(x, y, batch_size=args.batch_size, epochs=args.epochs, steps_per_epoch=args.steps, callbacks=[log],
              verbose=0)
    test_loss = float(model.evaluate(x_test, y_test, batch_size=256, verbose=0))
    baseline = unigram_loss(x, x_test, vocabulary_size)
    print(f"held-out loss {test_loss:.4f} nats/char ({test_loss / math.log(2):.3f} bits/char); "
          f"character frequencies: {baseline:.4f}")
    if hasattr(optimizer, "curvature_summary"):
        report_curvature(optimizer)
    return model


if __name__ == "__main__":
    main()
