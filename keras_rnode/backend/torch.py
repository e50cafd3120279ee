"""PyTorch implementations of the backend hooks.

Keras runs PyTorch eagerly, so the solver's loops are plain Python loops.
The solve is still one `torch.autograd.Function`: autograd through the
loops would keep every stage's activations (and differentiate the step
size controller), where the adjoint and direct gradients keep one state
per step or none.
"""

import numpy as np
import torch
from keras import ops

from keras_rnode.backend.common import recorder_read  # noqa: F401  (a hook)


def _parameters(func, y0, inputs):
    """The leaf tensors needing gradients that func reads besides y and inputs: its weights.

    TensorFlow's tape and JAX's closure conversion find them for us; here
    one evaluation at y0 (y and inputs detached, so the walk stays inside
    func) is walked back to its AccumulateGrad nodes. A tensor that func
    captures from outside the solve is walked through to the leaves it
    comes from, which then get their gradient through it (`vjp` keeps its
    graph for that).
    """
    with torch.enable_grad():
        out = func(torch.zeros((), dtype=y0[0].dtype), [y.detach() for y in y0],
                   [v.detach() for v in inputs])
    found, seen = {}, set()
    stack = [o.grad_fn for o in out if o.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)
        if leaf is not None:
            found[id(leaf)] = leaf
        stack.extend(fn for fn, _ in node.next_functions)
    return list(found.values())


class _Solve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan, *flat):
        func, forward, backward, n, m = plan
        y0, inputs, params = list(flat[:n]), list(flat[n:n + m]), list(flat[n + m:])
        y1, stats, residuals = forward(func, y0, inputs)
        ctx.plan, ctx.residuals, ctx.y1 = plan, residuals, y1
        ctx.y0, ctx.inputs, ctx.params = y0, inputs, params
        ctx.mark_non_differentiable(*stats)
        return (*y1, *stats)

    @staticmethod
    def backward(ctx, *cotangents):
        func, _, backward, n, _ = ctx.plan
        grads_y1 = [torch.zeros_like(y) if g is None else g
                    for y, g in zip(ctx.y1, cotangents[:n])]
        grads_y0, grads_inputs, grads_p = backward(
            lambda t, y, i, p: func(t, y, i), ctx.params, ctx.y0, ctx.inputs, ctx.residuals,
            ctx.y1, grads_y1)
        return (None, *grads_y0, *grads_inputs, *grads_p)


def differentiable_solve(func, y0, inputs, forward, backward):
    """forward(func, y0, inputs) -> (y1, stats, residuals), with a gradient of our own.

    func(t, y, inputs) is the dynamics; `inputs` (end times, `args`) are
    differentiated like y0. backward(func_p, params, y0, inputs, residuals,
    y1, grads_y1) -> (grads_y0, grads_inputs, grads_params): `params` are
    the weights func reads (found by `_parameters`) and func_p(t, y,
    inputs, params) is func, which reads them itself. backward=None, or
    nothing to differentiate: no gradient.
    """
    n, m = len(y0), len(inputs)
    wanted = backward is not None and torch.is_grad_enabled()
    params = _parameters(func, y0, inputs) if wanted else []
    if not (params or wanted and any(v.requires_grad for v in [*y0, *inputs])):
        with torch.no_grad():
            y1, stats, _ = forward(func, [y.detach() for y in y0], [v.detach() for v in inputs])
        return list(y1), list(stats)
    out = _Solve.apply((func, forward, backward, n, m), *y0, *inputs, *params)
    return list(out[:n]), list(out[n:])


def jacobian_product(fn, z, v):
    """(fn(z), v^T J) with J = dfn/dz, by reverse mode as on TensorFlow.

    torch.func's forward mode does not compose with the module hooks
    Keras layers run; the double-backward product does, and the graph is
    kept (create_graph) only when an outer gradient will need it.
    """
    outer = torch.is_grad_enabled()
    with torch.enable_grad():
        if not z.requires_grad:
            z = z.detach().requires_grad_()
        f = fn(z)
        (w,) = torch.autograd.grad(f, z, v, create_graph=outer)
    if not outer:
        return f.detach(), w.detach()
    return f, w


def host_call(fn, args, shape, dtype):
    """fn(*numpy arrays) -> a NumPy array of `shape` and `dtype`, as a tensor on args' device
    (PyTorch runs eagerly: a plain call)."""
    out = fn(*[a.detach().cpu().numpy() for a in args])
    return torch.as_tensor(np.asarray(out, dtype), device=args[0].device)


HOST_CALLS_COMPILE = True


def jvp(fn, primals, tangents):
    """(fn(*primals), J tangents): a forward-mode product by two reverse-mode ones.

    J v = d/du <J^T u, v> with a dummy cotangent u (torch.func's forward mode
    does not compose with Keras's module hooks; see `jacobian_product`).
    The graph is kept only when an outer gradient will need it.
    """
    outer = torch.is_grad_enabled()
    with torch.enable_grad():
        primals = [p if p.requires_grad else p.detach().requires_grad_() for p in primals]
        out = fn(*primals)
        u = torch.zeros_like(out, requires_grad=True)
        pulled = torch.autograd.grad(out, primals, u, create_graph=True, allow_unused=True)
        live = [(g, v) for g, v in zip(pulled, tangents) if g is not None and g.requires_grad]
        if live:
            (product,) = torch.autograd.grad([g for g, _ in live], u, [v for _, v in live],
                                             create_graph=outer, allow_unused=True)
        else:
            product = None
    product = torch.zeros_like(out) if product is None else product
    if not outer:
        return out.detach(), product.detach()
    return out, product


def vjp(fn, primals, params, cotangents):
    """fn(primals, params) -> outputs (a list); returns (outputs, grads_primals, grads_params)."""
    with torch.enable_grad():
        primals = [p.detach().requires_grad_() for p in primals]
        outputs = fn(primals, params)
        live = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]
        inputs = primals + list(params)
        wanted = [x for x in inputs if x.requires_grad]  # data (a context) may need none
        # retain_graph: a tensor func captured from outside the solve is
        # differentiated through at every step, so its graph must outlive one.
        found = iter(torch.autograd.grad(
            [o for o, _ in live], wanted, [c for _, c in live], allow_unused=True,
            retain_graph=True) if live else [None] * len(wanted))
    grads = [next(found) if x.requires_grad else None for x in inputs]
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]
    return ([o.detach() for o in outputs], grads[: len(primals)], grads[len(primals):])


def recorder_new(size, like):
    """Storage for one tensor per accepted step, for each tensor in `like`."""
    return [torch.zeros((size, *v.shape), dtype=v.dtype, device=v.device) for v in like]


def recorder_write(recorder, index, values, pred):
    """Write `values` at `index` when `pred` holds (a scalar boolean tensor)."""
    if bool(pred):
        for r, v in zip(recorder, values):
            r[index] = v
    return recorder


def inference_function(model, fn, input_shapes=None):
    """fn(*inputs) without building an autograd graph (the shapes need not be known)."""
    def run(*inputs):
        with torch.no_grad():
            return fn(*inputs)

    return run


def matmul(x1, x2):
    """x1 @ x2 in the inputs' dtype.

    Keras 3.15's PyTorch `ops.matmul` computes and returns float32 for two
    float64 inputs (its type promotion maps 64-bit floats to 32 bits off
    TensorFlow), so a float64 dynamics net would run in float32.
    """
    x1, x2 = ops.convert_to_tensor(x1), ops.convert_to_tensor(x2)
    if x1.dtype != x2.dtype:
        return ops.matmul(x1, x2)
    return torch.matmul(x1, x2)


def static_value(x):
    """x as NumPy (PyTorch runs eagerly: values are always known)."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def saved_model_endpoints():
    """No endpoints: Keras writes no SavedModel from PyTorch.

    Raises ValueError, whose message says how to export the model instead.
    """
    raise ValueError(
        "a SavedModel cannot be written from the PyTorch backend; save the model "
        "(model.save('m.keras')) and export it under KERAS_BACKEND=tensorflow or jax: "
        "the .keras file is the same on every backend")
