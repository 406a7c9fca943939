"""Invertible image transforms: round trips, log-dets against autograd Jacobians, dequantisation."""
import math

import pytest
import torch
from torch.autograd.functional import jacobian

from monoflow.blocks import ActNorm
from monoflow.transforms import (Flatten, LogitTransform, Normalize, Squeeze, UniformDequantization,
                                 VariationalDequantization, quantize)


def _full_logdet(fn, x):
    """log|det| of fn at each sample of x, from the dense autograd Jacobian."""
    out = []
    for i in range(x.shape[0]):
        J = jacobian(lambda v: fn(v.view(1, *x.shape[1:]))[0].reshape(-1), x[i].reshape(-1))
        out.append(torch.linalg.slogdet(J)[1])
    return torch.stack(out)


@pytest.mark.parametrize("transform", [
    Squeeze(2),
    LogitTransform(0.05),
    LogitTransform(1e-6),
    Normalize([0.4, 0.5], [0.2, 0.3]),
    Flatten(ActNorm(2 * 4 * 4)),
])
def test_round_trip_and_logdet(transform):
    torch.manual_seed(0)
    x = (torch.rand(3, 2, 4, 4, dtype=torch.float64) * 0.9 + 0.05)
    transform = transform.double()
    with torch.no_grad():
        transform(x)  # ActNorm initialisation
        transform.bias.data.normal_() if hasattr(transform, "bias") else None
    y, logdet = transform(x)
    x_back, inverse_logdet = transform.inverse(y)
    torch.testing.assert_close(x_back, x)
    torch.testing.assert_close(logdet, -inverse_logdet)
    torch.testing.assert_close(logdet, _full_logdet(transform, x))


def test_squeeze_layout():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    y, _ = Squeeze(2)(x)
    # channel i*2+j holds pixel (i, j) of every 2x2 patch
    assert y[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    assert y[0, 3].tolist() == [[5.0, 7.0], [13.0, 15.0]]
    with pytest.raises(ValueError, match="divisible"):
        Squeeze(2)(torch.zeros(1, 1, 3, 4))


def test_logit_values():
    y, ld = LogitTransform(0.0)(torch.full((1, 1, 1, 1), 0.5))
    assert float(y) == 0.0 and math.isclose(float(ld), math.log(4.0), rel_tol=1e-6)
    with pytest.raises(ValueError):
        LogitTransform(0.5)


def test_uniform_dequantization():
    k = torch.randint(0, 17, (5, 1, 8, 8), dtype=torch.uint8)
    deq = UniformDequantization(17)
    x, term = deq(k, generator=torch.Generator().manual_seed(0))
    assert ((x * 17).floor() == k.float()).all()
    torch.testing.assert_close(term, torch.full((5,), -64 * math.log(17.0)))
    back, _ = deq.inverse(x)
    assert torch.equal(back, k.float())
    assert torch.equal(quantize(torch.tensor([1.0, -0.1, 0.999]), 4), torch.tensor([3.0, 0.0, 3.0]))


def test_variational_dequantization_density():
    """-log q(u|k) from the module equals the change of variables computed independently."""
    torch.manual_seed(0)
    deq = VariationalDequantization(1, n_levels=4, n_blocks=2, depth=2, growth=8, cond_channels=16, hidden=16,
                                    n_bottlenecks=1, logdet="exact").double()
    for block in deq.blocks:
        block.estimator = _ExactConv()
    k = torch.randint(0, 4, (2, 1, 2, 2)).double()
    with torch.no_grad():
        deq(k)  # spectral-norm state
    gen_seed = 7
    x, term = deq(k, generator=torch.Generator().manual_seed(gen_seed))
    eps = torch.randn(k.shape, generator=torch.Generator().manual_seed(gen_seed), dtype=torch.float64)
    image = k / 3 - 0.5

    def flow(e):
        v = e
        for block in deq.blocks:
            v, _ = block(v, image[: e.shape[0]])
        return v

    v = flow(eps)
    u = torch.sigmoid(v)
    torch.testing.assert_close(x, (k + u) / 4)
    logdets = []
    for i in range(2):
        def one(e, i=i):
            vv = eps.clone()
            vv = vv.index_put((torch.tensor([i]),), e.view(1, 1, 2, 2))
            return torch.sigmoid(flow(vv))[i].reshape(-1)
        J = jacobian(one, eps[i].reshape(-1))
        logdets.append(torch.linalg.slogdet(J)[1])
    log_normal = (-0.5 * eps**2 - 0.5 * math.log(2 * math.pi)).sum(dim=(1, 2, 3))
    log_q = log_normal - torch.stack(logdets)
    torch.testing.assert_close(term, -4 * math.log(4) - log_q)


class _ExactConv:
    """Exact log det(I + J) of g on image-shaped inputs (test oracle for the conditional blocks)."""

    def __call__(self, g, w, series, training, cache=None):
        d = w[0].numel()
        with torch.enable_grad():
            w_ = w.detach().requires_grad_(True)
            out = g(w_).reshape(w.shape[0], d)
            rows = [torch.autograd.grad(out[:, i].sum(), w_, retain_graph=True)[0].reshape(w.shape[0], d)
                    for i in range(d)]
        return series.exact(torch.stack(rows, 1))
