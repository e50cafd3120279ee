"""A reference RNODE in PyTorch + torchdiffeq, written the way the paper's released code works.

Finlay, Jacobsen, Nurbekyan, Oberman, "How to train your neural ODE: the
world of Jacobian and kinetic regularization" (ICML 2020), on FFJORD
(Grathwohl et al., ICLR 2019). Written from the paper and the torchdiffeq
documentation for the benchmarks (benchmarks/plateau.py, the GPU scripts),
not copied from the released code. What it shares with that code, on
purpose, because these choices decide how much a step learns and costs:

- dynamics: FFJORD's ConcatSquash linear layers,
  ``layer(x) * sigmoid(gate(t)) + hyper_bias(t)`` with ``layer =
  Linear(d_in, d_out)``, ``gate = Linear(1, d_out)``, ``hyper_bias =
  Linear(1, d_out, bias=False)``, all with PyTorch's default
  initialization (weights and biases uniform in +-1/sqrt(fan_in), so the
  time maps are uniform in +-1); nothing is zeroed, so the flow starts as
  a small random drift, not the identity.
- state: ``(z, delta_logp, kinetic, jacobian)`` integrated together from
  ``(x, 0, 0, 0)`` over [0, T] (paper, eq. 9 and Sec. 4), with
  ``d delta_logp/dt = -tr(df/dz)``, ``d kinetic/dt = 0.5 * mean_i f_i^2``
  and ``d jacobian/dt = mean_i (eps^T df/dz)_i^2`` (per-dimension means,
  the normalization under which lambda_K = lambda_J = 0.01 is the paper's
  setting).
- Hutchinson: one Gaussian eps per sample and per solve, fixed across the
  solver's stages; ONE vector-Jacobian product ``eps^T J`` per evaluation
  gives both ``tr(J) ~ (eps^T J) . eps`` and ``||J||_F^2 ~ ||eps^T J||^2``
  (paper, eq. 11).
- solver: torchdiffeq's dopri5 at rtol = atol = 1e-5, the regularizer
  states left out of error control by a huge tolerance (1e20) on them in
  both the forward and the adjoint solve; gradients by
  ``torchdiffeq.odeint_adjoint``.
- loss (nats for 2-D data): ``-mean log p(x) + lambda_K mean(kinetic) +
  lambda_J mean(jacobian)``.

API (device-agnostic: CUDA when available, else the CPU)::

    ref = Reference(dim=2, hidden=(64, 64, 64), seed=0)
    logs = ref.train_step(batch)   # (batch, dim) array: loss, nll, kinetic, jacobian, nfe, backward_nfe
    ref.nll(x)                     # mean -log p(x) in nats, exact trace, dopri5 at 1e-5, no gradient

Shapes: ``x`` and ``batch`` are (n, dim) float arrays or tensors; log
densities are in nats.
"""

import math

import numpy as np
import torch
from torch import nn
from torchdiffeq import odeint, odeint_adjoint

# A tolerance no error estimate reaches: the state is integrated but never
# shrinks a step (the released code's way of leaving the regularizers out).
HUGE_TOL = 1e20


def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ConcatSquashLinear(nn.Module):
    """FFJORD's ConcatSquashLinear: (W x + b) * sigmoid(w_g t + b_g) + w_h t.

    x: (batch, d_in) -> (batch, d_out); t: a scalar tensor. PyTorch's
    default Linear initialization throughout.
    """

    def __init__(self, d_in, d_out):
        super().__init__()
        self.layer = nn.Linear(d_in, d_out)
        self.gate = nn.Linear(1, d_out)
        self.hyper_bias = nn.Linear(1, d_out, bias=False)

    def forward(self, t, x):
        t = t.reshape(1, 1).to(x)
        return self.layer(x) * torch.sigmoid(self.gate(t)) + self.hyper_bias(t)


class ConcatSquashNet(nn.Module):
    """f(t, z): ConcatSquash layers of widths hidden + (dim,), `activation` between them."""

    def __init__(self, dim, hidden=(64, 64, 64), activation=nn.Softplus):
        super().__init__()
        widths = (dim, *hidden, dim)
        self.layers = nn.ModuleList(
            ConcatSquashLinear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.activation = activation()

    def forward(self, t, z):
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(t, h)
            if i < len(self.layers) - 1:
                h = self.activation(h)
        return h


def exact_divergence(f, z, create_graph):
    """tr(df/dz) per sample, (batch,): one reverse pass per dimension (low dimension only)."""
    div = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    for i in range(z.shape[1]):
        div = div + torch.autograd.grad(f[:, i].sum(), z, create_graph=create_graph,
                                        retain_graph=True)[0][:, i]
    return div


class AugmentedDynamics(nn.Module):
    """d/dt of (z, delta_logp[, kinetic, jacobian]) for one solve; counts its evaluations.

    Set `eps` (batch, dim) before a Hutchinson solve; `regularize` adds
    the two regularizer states; `exact` uses the exact trace instead.
    """

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.eps = None
        self.exact = False
        self.regularize = True
        self.nfe = 0

    def forward(self, t, state):
        self.nfe += 1
        z = state[0]
        # Grad mode is on only in the adjoint's backward solve, which
        # differentiates these derivatives again (for the parameters).
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            f = self.net(t, z)
            if self.exact:
                div = exact_divergence(f, z, create_graph)
                vjp = None
            else:
                # One vector-Jacobian product: eps^T J gives trace and Frobenius estimates.
                vjp = torch.autograd.grad(f, z, self.eps, create_graph=create_graph)[0]
                div = (vjp * self.eps).sum(dim=1)
        derivatives = (f, -div)
        if self.regularize:
            kinetic = 0.5 * f.pow(2).mean(dim=1)
            jacobian = vjp.pow(2).mean(dim=1)
            derivatives += (kinetic, jacobian)
        return derivatives


def standard_normal_logprob(z):
    """log N(z; 0, I) summed over the event, (batch,)."""
    return -0.5 * (z.shape[1] * math.log(2 * math.pi) + z.pow(2).sum(dim=1))


class Reference:
    """One RNODE block trained with Adam; see the module docstring.

    Args:
        dim: event dimension of the (flat) data.
        hidden: widths of the ConcatSquash MLP's hidden layers.
        seed: seeds the initial weights and the Hutchinson noise.
        kinetic, jacobian: lambda_K, lambda_J (paper: 0.01 each).
        tol: rtol = atol of dopri5 in training and evaluation.
        lr: Adam's learning rate.
        T: integration time.
        device: a torch.device; default CUDA when available.
    """

    def __init__(self, dim, hidden=(64, 64, 64), seed=0, kinetic=0.01, jacobian=0.01,
                 tol=1e-5, lr=1e-3, T=1.0, device=None):
        self.device = device or default_device()
        torch.manual_seed(seed)
        self.func = AugmentedDynamics(ConcatSquashNet(dim, hidden)).to(self.device)
        self.optimizer = torch.optim.Adam(self.func.parameters(), lr=lr)
        self.noise = torch.Generator(device=self.device).manual_seed(seed + 1)
        self.lam_k, self.lam_j, self.tol = kinetic, jacobian, tol
        self.times = torch.tensor([0.0, T], device=self.device)

    def _tensor(self, x):
        return torch.as_tensor(np.asarray(x, dtype=np.float32), device=self.device)

    def _tolerances(self, state):
        """Per-state tolerances for the forward solve and the adjoint solve (as torchdiffeq takes them)."""
        tol = self.tol
        forward = [tol, tol, HUGE_TOL, HUGE_TOL]
        # The adjoint state is (t, y, a_y, *a_params), y and a_y flattened: the
        # regularizer states keep their huge tolerance there too.
        flat = torch.cat([torch.full((s.numel(),), float(t), device=self.device)
                          for s, t in zip(state, forward)])
        params = [tol for p in self.func.parameters() if p.requires_grad]
        adjoint = [tol, flat, flat, *params]
        return forward, adjoint

    def train_step(self, batch):
        """One Adam step on `batch` (n, dim); returns the step's floats (loss, nll, nfe, ...)."""
        func = self.func
        func.train()
        func.exact, func.regularize = False, True
        x = self._tensor(batch)
        n = x.shape[0]
        func.eps = torch.randn(x.shape, generator=self.noise, device=self.device)
        zeros = torch.zeros(n, device=self.device)
        state = (x, zeros, zeros, zeros)
        rtol, adjoint_tol = self._tolerances(state)
        func.nfe = 0
        z, delta_logp, kinetic, jacobian = (
            s[-1] for s in odeint_adjoint(func, state, self.times, rtol=rtol, atol=rtol,
                                          method="dopri5", adjoint_rtol=adjoint_tol,
                                          adjoint_atol=adjoint_tol))
        nfe = func.nfe
        log_p = standard_normal_logprob(z) - delta_logp
        nll = -log_p.mean()
        loss = nll + self.lam_k * kinetic.mean() + self.lam_j * jacobian.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item(), "nll": nll.item(), "kinetic": kinetic.mean().item(),
                "jacobian": jacobian.mean().item(), "nfe": nfe,
                "backward_nfe": func.nfe - nfe}

    def log_prob(self, x):
        """log p(x) in nats, (n,) NumPy: exact trace, dopri5 at `tol`, no regularizers."""
        func = self.func
        func.eval()
        func.exact, func.regularize = True, False
        x = self._tensor(x)
        func.nfe = 0
        with torch.no_grad():
            z, delta_logp = (s[-1] for s in odeint(
                func, (x, torch.zeros(x.shape[0], device=self.device)), self.times,
                rtol=self.tol, atol=self.tol, method="dopri5"))
        self.eval_nfe = func.nfe
        return (standard_normal_logprob(z) - delta_logp).cpu().numpy()

    def nll(self, x):
        """Mean -log p(x) in nats over x (n, dim), exact trace; the solve's NFE in `eval_nfe`."""
        return float(-np.mean(self.log_prob(x)))


def build(dim, hidden=(64, 64, 64), seed=0, **kwargs):
    """A fresh `Reference` (see its Args)."""
    return Reference(dim, hidden=hidden, seed=seed, **kwargs)
