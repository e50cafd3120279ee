"""Keras layers: dynamics networks, the CNF block and data transforms."""

from typing import TYPE_CHECKING

from keras_rnode import lazy

# What tools read; at run time each name is imported when first read
# (keras_rnode.lazy): the package's option names (divergence.TRACES) load
# without keras.
if TYPE_CHECKING:
    from keras_rnode.layers.cnf import CNF
    from keras_rnode.layers.dynamics import (ConcatConvNet, ConcatSquashConvNet, ConcatSquashMLP,
                                             Flattened)
    from keras_rnode.layers.space_to_depth import squeeze, unsqueeze
    from keras_rnode.layers.transforms import Dequantize, LogitTransform

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
__getattr__, __dir__ = lazy.attach(__name__)
