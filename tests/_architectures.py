"""Standard Keras architectures no one in this project designed, small enough to train in a test.

Shared by tests/test_architectures.py and its MirroredStrategy subprocess
(tests/_architecture_mirrored_worker.py). Every builder returns ``(model, loss, data)`` with
``data = (x, y)`` numpy arrays; the models come from ``keras.applications``, keras_hub (built from
configs, no weights, nothing downloaded) or stock Keras layers, as a user would write them.
"""

import numpy as np
import keras

VOCAB, SEQUENCE, EXAMPLES = 40, 12, 64


def _tokens(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(1, VOCAB, (EXAMPLES, SEQUENCE)).astype("int32")
    return x, rng


def _text_labels(x):
    return ((x[:, :3] % 4).sum(axis=1) % 2).astype("int32")


def mobilenet_v2():
    """``keras.applications.MobileNetV2`` (Conv2D, DepthwiseConv2D, BatchNormalization, Dense)."""
    model = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=4, include_top=True
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 32, 32, 3)).astype("float32")
    y = (x[:, :16].mean(axis=(1, 2, 3)) > 0).astype("int32") * 2 + (x[..., 0].mean(axis=(1, 2)) > 0)
    return model, keras.losses.SparseCategoricalCrossentropy(), (x, y.astype("int32"))


def mobilenet_style():
    """A MobileNet-style stack of stock layers: conv stem, depthwise-separable blocks, BN, head."""
    inputs = keras.Input((16, 16, 3))
    h = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(inputs)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU(6.0)(h)
    for filters, stride in ((16, 1), (24, 2)):
        h = keras.layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False)(h)
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.ReLU(6.0)(h)
        h = keras.layers.Conv2D(filters, 1, use_bias=False)(h)
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.ReLU(6.0)(h)
    h = keras.layers.SeparableConv2D(24, 3, padding="same")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(3)(h)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(EXAMPLES, 16, 16, 3)).astype("float32")
    y = (x[:, :8].mean(axis=(1, 2, 3)) > 0).astype("int32") + (x[..., 1].mean(axis=(1, 2)) > 0)
    model = keras.Model(inputs, outputs, name="mobilenet_style")
    return model, keras.losses.SparseCategoricalCrossentropy(from_logits=True), (x, y.astype("int32"))


def bert_classifier():
    """keras_hub BERT (token/position/segment embeddings, LayerNorm, attention) + a Dense head."""
    import keras_hub

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCAB, num_layers=1, num_heads=2, hidden_dim=16, intermediate_dim=32,
        max_sequence_length=SEQUENCE, dropout=0.0,
    )
    model = keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=2, preprocessor=None, dropout=0.0)
    x, _ = _tokens()
    data = {
        "token_ids": x,
        "segment_ids": np.zeros_like(x),
        "padding_mask": np.ones_like(x),
    }
    # The label is the first token's parity: what BERT's pooled first position sees at once.
    return model, keras.losses.SparseCategoricalCrossentropy(from_logits=True), (data, (x[:, 0] % 2).astype("int32"))


def gpt2_causal_lm():
    """keras_hub GPT-2 causal LM (tied ReversibleEmbedding, PositionEmbedding, LayerNorm, attention)."""
    import keras_hub

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB, num_layers=1, num_heads=2, hidden_dim=16, intermediate_dim=32,
        max_sequence_length=SEQUENCE, dropout=0.0,
    )
    model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    x, _ = _tokens()
    data = {"token_ids": x[:, :-1], "padding_mask": np.ones_like(x[:, :-1])}
    return model, keras.losses.SparseCategoricalCrossentropy(from_logits=True), (data, x[:, 1:])


def _text_classifier(recurrent):
    model = keras.Sequential(
        [keras.Input((SEQUENCE,), dtype="int32"), keras.layers.Embedding(VOCAB, 16), recurrent, keras.layers.Dense(2)]
    )
    x, _ = _tokens()
    return model, keras.losses.SparseCategoricalCrossentropy(from_logits=True), (x, _text_labels(x))


def lstm_classifier():
    return _text_classifier(keras.layers.LSTM(16))


def gru_classifier():
    return _text_classifier(keras.layers.GRU(16))


def conv1d_classifier():
    model = keras.Sequential(
        [
            keras.Input((SEQUENCE,), dtype="int32"),
            keras.layers.Embedding(VOCAB, 16),
            keras.layers.Conv1D(16, 3, padding="same", activation="relu"),
            keras.layers.GlobalMaxPooling1D(),
            keras.layers.Dense(2),
        ]
    )
    x, _ = _tokens()
    return model, keras.losses.SparseCategoricalCrossentropy(from_logits=True), (x, _text_labels(x))


def stock_transformer():
    """A causal transformer LM of stock layers: Embedding, MultiHeadAttention, LayerNorm, Dense."""
    tokens = keras.Input((SEQUENCE - 1,), dtype="int32")
    h = keras.layers.Embedding(VOCAB, 16)(tokens)
    positions = keras.layers.Embedding(SEQUENCE, 16)(keras.ops.arange(SEQUENCE - 1)[None])
    h = h + positions
    a = keras.layers.LayerNormalization()(h)
    h = h + keras.layers.MultiHeadAttention(2, 8)(a, a, use_causal_mask=True)
    m = keras.layers.LayerNormalization()(h)
    h = h + keras.layers.Dense(16)(keras.layers.Dense(32, activation="gelu")(m))
    outputs = keras.layers.Dense(VOCAB)(keras.layers.LayerNormalization()(h))
    x, _ = _tokens()
    model = keras.Model(tokens, outputs, name="stock_transformer")
    return model, keras.losses.SparseCategoricalCrossentropy(from_logits=True), (x[:, :-1], x[:, 1:])


ARCHITECTURES = {
    "mobilenet_style": mobilenet_style,
    "bert_classifier": bert_classifier,
    "gpt2_causal_lm": gpt2_causal_lm,
    "lstm_classifier": lstm_classifier,
    "gru_classifier": gru_classifier,
    "conv1d_classifier": conv1d_classifier,
    "stock_transformer": stock_transformer,
}
