"""Keras layers: dynamics networks, the CNF block and data transforms."""

from keras_rnode.layers.cnf import CNF
from keras_rnode.layers.dynamics import (
    ConcatConvNet,
    ConcatSquashConvNet,
    ConcatSquashMLP,
)
from keras_rnode.layers.squeeze import squeeze, unsqueeze
from keras_rnode.layers.transforms import Dequantize, LogitTransform

__all__ = [
    "CNF",
    "ConcatConvNet",
    "ConcatSquashConvNet",
    "ConcatSquashMLP",
    "Dequantize",
    "LogitTransform",
    "squeeze",
    "unsqueeze",
]
