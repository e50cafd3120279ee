"""Figures of a model: its density beside the data (2-D), and its samples (2-D or images).

matplotlib is imported inside the functions: a model that is never drawn
never pays for it; keras (through keras_rnode.evaluation) likewise, so that
the command line's help loads without it.
"""

import math

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, axes, path):
    """Write the figure to `path` without axis ticks, and free it."""
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    # tight_layout leaves equal-aspect panels' two-line titles outside the canvas
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_density(model, x, path, batch_size=500, resolution=80):
    """2-D data: a histogram of x beside the model's density on a grid."""
    from keras_rnode.evaluation import log_prob_batches

    lo, hi = np.percentile(x, [0.5, 99.5], axis=0)
    pad = 0.1 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], resolution),
                         np.linspace(lo[1], hi[1], resolution))
    grid = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.float32)
    # A picture: far from the data a solve may give up; show what it has.
    log_p, _, _ = log_prob_batches(model, grid, batch_size, strict=False)
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    axes[0].hist2d(x[:, 0], x[:, 1], bins=resolution, range=[[lo[0], hi[0]], [lo[1], hi[1]]])
    axes[0].set_title("data")
    axes[1].pcolormesh(gx, gy, np.exp(log_p).reshape(gx.shape), shading="auto")
    axes[1].set_title("model density")
    for ax in axes:
        ax.set_aspect("equal")
    _save(plt, fig, axes, path)


# Channels an image can be drawn with: grey, RGB, RGBA.
IMAGE_CHANNELS = (1, 3, 4)


def drawable(event_shape):
    """True when samples of event_shape draw as a PNG: 2-D points or images of 1, 3 or 4
    channels."""
    event_shape = tuple(event_shape)
    return event_shape == (2,) or (len(event_shape) == 3 and event_shape[-1] in IMAGE_CHANNELS)


def save_samples(samples, path, levels=None):
    """Samples to .npy (the array) or .png (a scatter for 2-D, a grid for images)."""
    samples = np.asarray(samples)
    if path.endswith(".npy"):
        np.save(path, samples)
        return
    if not path.endswith(".png"):
        raise ValueError(f"samples are written to a .npy or .png file, got {path!r}")
    if not drawable(samples.shape[1:]):
        raise ValueError(f"cannot draw samples of shape {samples.shape[1:]} as a PNG (2-D "
                         f"points or images of {'/'.join(map(str, IMAGE_CHANNELS))} "
                         "channels); write them to a .npy file")
    plt = _pyplot()
    if samples.ndim == 4:
        n = len(samples)
        cols = math.ceil(math.sqrt(n))
        rows = math.ceil(n / cols)
        h, w, c = samples.shape[1:]
        canvas = np.zeros((rows * (h + 1) + 1, cols * (w + 1) + 1, c), np.float32)
        scale = (levels - 1) if levels else max(float(samples.max()), 1.0)
        for i, image in enumerate(samples):
            r, q = divmod(i, cols)
            canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = (
                image / scale)
        fig, ax = plt.subplots(figsize=(cols * 0.6 + 1, rows * 0.6 + 1))
        ax.imshow(canvas[..., 0] if c == 1 else np.clip(canvas, 0, 1), cmap="gray",
                  vmin=0, vmax=1)
    else:
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(samples[:, 0], samples[:, 1], s=2)
        ax.set_aspect("equal")
    _save(plt, fig, [ax], path)


def plot_trajectories(panels, path, titles=None):
    """2-D particle paths z(t), from the data (dots) to the noise, one panel per array.

    `panels`: arrays of (times, n, 2) positions (`keras_rnode.trajectories`),
    drawn side by side under `titles`.
    """
    from matplotlib.collections import LineCollection

    plt = _pyplot()
    titles = titles or [None] * len(panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    for ax, paths, title in zip(axes[0], panels, titles):
        paths = np.asarray(paths)
        if paths.ndim != 3 or paths.shape[2] != 2:
            raise ValueError(f"trajectories are drawn for 2-D data: (times, n, 2) positions, "
                             f"got shape {paths.shape}")
        ax.add_collection(LineCollection(np.swapaxes(paths, 0, 1), linewidths=0.5,
                                         alpha=0.5, color="tab:blue"))
        ax.scatter(paths[0, :, 0], paths[0, :, 1], s=3, color="black", zorder=3,
                   label="data (t = 0)")
        ax.scatter(paths[-1, :, 0], paths[-1, :, 1], s=3, color="tab:orange", zorder=3,
                   label="noise (t = T)")
        ax.autoscale()
        ax.set_aspect("equal")
        if title:
            ax.set_title(title, fontsize=9)
    axes[0][0].legend(loc="lower left", fontsize=7, markerscale=3)
    _save(plt, fig, axes[0], path)
