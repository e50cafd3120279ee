"""Keras layers: dynamics networks, the CNF block and data transforms."""
