"""Keras layers: dynamics networks, the CNF block and data transforms."""

from keras_rnode.lazy import lazy_package

__all__ = [
    "CNF",
    "ConcatConvNet",
    "ConcatSquashConvNet",
    "ConcatSquashMLP",
    "Flattened",
    "Dequantize",
    "LogitTransform",
    "squeeze",
    "unsqueeze",
]

# Each name is imported when first read (keras_rnode.lazy): the package's
# option names (divergence.TRACES) load without keras.
lazy_package(__name__, {
    "CNF": "keras_rnode.layers.cnf",
    **{name: "keras_rnode.layers.dynamics" for name in ("ConcatConvNet", "ConcatSquashConvNet",
                                                        "ConcatSquashMLP", "Flattened")},
    **{name: "keras_rnode.layers.squeeze" for name in ("squeeze", "unsqueeze")},
    **{name: "keras_rnode.layers.transforms" for name in ("Dequantize", "LogitTransform")},
})
