"""Squeeze (space to depth) and its inverse for channels-last images.

Each 2x2 patch of a (batch, H, W, C) image becomes 4 channels of a
(batch, H/2, W/2, 4C) image, in tf.nn.space_to_depth's order. A pure
permutation of the entries, so its log-det is zero. The multiscale model
(`keras_rnode.models.multiscale`) squeezes between its CNF blocks.
"""

from keras import ops


def _static_hwc(x, what):
    shape = tuple(x.shape)
    if len(shape) != 4 or None in shape[1:]:
        raise ValueError(f"{what} needs (batch, height, width, channels) with known "
                         f"height, width and channels, got shape {shape}")
    return shape[1:]


def squeeze(x, factor=2):
    """(batch, H, W, C) -> (batch, H/f, W/f, f*f*C); H and W must be divisible by f."""
    h, w, c = _static_hwc(x, "squeeze")
    if h % factor or w % factor:
        raise ValueError(f"squeeze by {factor} needs height and width divisible by "
                         f"{factor}, got {h}x{w}")
    x = ops.reshape(x, (-1, h // factor, factor, w // factor, factor, c))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(x, (-1, h // factor, w // factor, factor * factor * c))


def unsqueeze(x, factor=2):
    """The inverse of `squeeze`: (batch, H, W, f*f*C) -> (batch, f*H, f*W, C)."""
    h, w, c = _static_hwc(x, "unsqueeze")
    if c % (factor * factor):
        raise ValueError(f"unsqueeze by {factor} needs channels divisible by "
                         f"{factor * factor}, got {c}")
    c //= factor * factor
    x = ops.reshape(x, (-1, h, w, factor, factor, c))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(x, (-1, h * factor, w * factor, c))
