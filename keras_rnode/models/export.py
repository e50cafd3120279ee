"""Export an RNODE model as a TensorFlow SavedModel with `log_prob` and `sample` endpoints.

The archive is written next to its destination under a temporary name and
renamed into place only once complete, so an export that dies half-way
never leaves a half-written model where a good one stood.

Endpoints of the reloaded object (`tf.saved_model.load(path)`):

- ``log_prob(x)``: x float32 of shape (None, *event_shape), returns log p
  per sample with the model's evaluation solver and trace, as
  ``model.log_prob(x)`` does (equal up to float32 rounding: the archive runs
  a graph, the model may run eagerly). For image models x holds grey levels 0..L-1 and
  the figure is of the uniformly dequantized y = (x + u) / L: u is drawn
  from the model's dequantization seed generator, whose state is saved
  with the archive and advances with each call. A freshly exported and a
  freshly reloaded model therefore agree call for call; for a noise-free
  comparison use a deterministic model (``trace="exact"``; the midpoint
  figure of images is ``model.bits_per_dim(x, midpoint=True)`` in Keras).
- ``sample(n)``: n a scalar int32, returns n samples (images as grey levels
  in [0, L-1]), drawing from the first block's seed generator as
  ``model.sample(n)`` does. Exported from TensorFlow only: from JAX (through
  jax2tf) the archive has ``log_prob`` alone, as a count cannot set a shape.
  PyTorch cannot write a SavedModel: load the .keras file under TensorFlow.
  (`keras_rnode.backend.saved_model_endpoints` says which, per backend.)
- A conditional model (its dynamics take a context): ``log_prob(x, context)``
  with context float32 (None, C), and ``sample(context)``, one sample per
  row of the context.

The endpoints are for inference: the solver's custom (adjoint) gradient is
not saved, so do not differentiate through the reloaded functions.
"""

import os
import secrets
import shutil
import tempfile

import keras

from keras_rnode import backend
from keras_rnode.backend.common import import_tensorflow


def export_saved_model(model, filepath, overwrite=False, verbose=False):
    """Write `model` as a SavedModel at `filepath` (a directory); returns the path."""
    # Asked first: the backend refuses (PyTorch) before TensorFlow is needed.
    endpoints = backend.saved_model_endpoints()
    # Imported here: a SavedModel is TensorFlow's, whatever runs the model (JAX: jax2tf).
    tf = import_tensorflow("exporting a SavedModel")

    if not model.built:
        raise ValueError("the model must be built (called on data) before exporting")
    filepath = os.path.abspath(os.fspath(filepath))
    if os.path.lexists(filepath) and not overwrite:
        raise FileExistsError(f"{filepath} exists; pass overwrite=True to replace it")
    parent, name = os.path.split(filepath)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"the folder {parent} does not exist")

    x_spec = tf.TensorSpec((None, *model.event_shape), tf.float32, name="x")
    if model.conditional:
        context = tf.TensorSpec((None, model.blocks[0].context_dim), tf.float32, name="context")
        definitions = {
            "log_prob": (lambda x, c: model.log_prob(x, c), [x_spec, context]),
            "sample": (lambda c: model.sample(tf.shape(c)[0], c), [context]),
        }
    else:
        definitions = {
            "log_prob": (lambda x: model.log_prob(x), [x_spec]),
            "sample": (lambda n: model.sample(n), [tf.TensorSpec((), tf.int32, name="n")]),
        }
    archive = keras.export.ExportArchive()
    archive.track(model)
    for endpoint in endpoints:
        fn, specs = definitions[endpoint]
        archive.add_endpoint(endpoint, fn, input_signature=specs)

    staging = _staging_dir(parent, name)
    try:
        # The endpoints are for inference: leaving out the solver's custom
        # (adjoint) gradients saves tracing the backward solve.
        options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
        archive.write_out(staging, options=options, verbose=verbose)
        _move_into_place(staging, filepath)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return filepath


def _staging_dir(parent, name):
    """A new, empty folder beside the destination, made with the umask's permissions, as
    the export that is renamed from it should have (tempfile.mkdtemp's are 0700)."""
    while True:
        path = os.path.join(parent, f".{name}.partial-{secrets.token_hex(6)}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:  # taken by another export: draw another name
            continue


def _move_into_place(staging, filepath):
    """Rename `staging` to `filepath`, replacing what stood there only once it is out of the way."""
    if not os.path.lexists(filepath):
        os.rename(staging, filepath)
        return
    parent, name = os.path.split(filepath)
    # A directory cannot be renamed over a non-empty one: move the old one
    # aside first, then delete it once the new one stands in its place.
    old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
    aside = os.path.join(old, name)
    os.rename(filepath, aside)
    try:
        os.rename(staging, filepath)
    except BaseException:
        os.rename(aside, filepath)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
