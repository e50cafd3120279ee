"""The conv dynamics of an image model by name (`multiscale_rnode(dynamics=...)`,
`rnode train --layer-type`): each a class of keras_rnode.layers.dynamics.

Names only, in a module free of keras, so that the command line's help lists
them without loading it; `multiscale.DYNAMICS` maps each to its class.
"""

CONV_DYNAMICS = {"concat": "ConcatConvNet", "concatsquash": "ConcatSquashConvNet"}
