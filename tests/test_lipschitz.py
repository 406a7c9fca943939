"""Tests of monoflow.lipschitz: spectral normalisation against exact singular values and dense
convolution matrices, Jacobian propagation against autograd, certificates against empirical
Lipschitz ratios, parameter counts of the paper's models."""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from monoflow.lipschitz import (
    DenseNet,
    LipschitzCertificate,
    LipschitzDenseLayer,
    SpectralNormConv2d,
    SpectralNormLinear,
    certify_lipschitz,
    conv_operator_norm_bound,
    dense_convnet,
    dense_mlp,
    set_learnable_concat,
    update_lipschitz,
)

F64 = torch.float64


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def conv_matrix(weight: torch.Tensor, size, stride=1, padding=1) -> torch.Tensor:
    """Dense matrix of x -> conv2d(x, weight) on inputs (C_in, H, W), column by column."""
    c_in = weight.shape[1]
    n = c_in * size[0] * size[1]
    basis = torch.eye(n, dtype=weight.dtype).reshape(n, c_in, *size)
    out = F.conv2d(basis, weight, stride=stride, padding=padding)
    return out.reshape(n, -1).t()


def test_parameter_counts_match_the_paper():
    assert n_params(dense_mlp(2, 3, 16, "cpila", coeff=0.9, lip_coeff=0.98)) == 564
    assert 10 * n_params(dense_mlp(2, 3, 16, "cpila")) == 5640
    assert n_params(dense_mlp(2, 3, 16, "clipswish", coeff=0.9)) == 567
    assert 10 * n_params(dense_mlp(2, 3, 16, "clipswish")) == 5670
    assert n_params(dense_mlp(1, 4, 128, "crelu", coeff=0.99, lip_coeff=0.99)) == 50_186


def test_dense_mlp_structure():
    g = dense_mlp(3, 2, 8, "lipswish")
    assert isinstance(g, DenseNet)
    dense = [m for m in g.modules() if isinstance(m, LipschitzDenseLayer)]
    assert [layer.linear.out_features for layer in dense] == [8, 8]  # non-concatenating
    assert g.layers[-1].in_features == 3 + 2 * 8
    assert dense[0].activation is not dense[1].activation
    assert g(torch.randn(5, 3)).shape == (5, 3)
    g = dense_mlp(3, 2, 8, "cpila")
    assert [m.linear.out_features for m in g.layers[:-1]] == [4, 4]


def test_power_iteration_converges_to_exact_norm():
    torch.manual_seed(0)
    layer = SpectralNormLinear(7, 5, coeff=0.97).double()
    with torch.no_grad():
        layer.weight.mul_(3.0)
    iterations = layer.power_iteration(tol=1e-12, max_iterations=5000)
    assert 1 <= iterations < 5000
    exact = torch.linalg.matrix_norm(layer.weight.detach(), 2).item()
    assert layer.sigma_estimate() == pytest.approx(exact, rel=1e-8)
    normalized = torch.linalg.matrix_norm(layer.normalized_weight().detach(), 2).item()
    assert normalized == pytest.approx(0.97, rel=1e-8)
    assert layer.lipschitz_bound() == pytest.approx(0.97, rel=1e-8)
    assert layer.power_iteration(n_iterations=4) == 4
    assert layer.power_iteration(n_iterations=0) == 0


def test_fresh_linear_layer_is_constrained_and_small_weights_untouched():
    torch.manual_seed(1)
    layer = SpectralNormLinear(30, 20, coeff=0.5)
    assert torch.linalg.matrix_norm(layer.normalized_weight().detach(), 2).item() < 0.5 * 1.05
    small = SpectralNormLinear(4, 4, coeff=0.99)
    with torch.no_grad():
        small.weight.mul_(0.01)  # far below the bound: normalisation leaves it alone
    update_lipschitz(small)
    torch.testing.assert_close(small.normalized_weight(), small.weight)


def test_forward_is_differentiable_in_weight_and_leaves_buffers():
    torch.manual_seed(2)
    layer = SpectralNormLinear(4, 3, coeff=0.5).double()
    u, v = layer.u.clone(), layer.v.clone()
    x = torch.randn(6, 4, dtype=F64)

    def manual(weight, bias):
        sigma = u @ weight @ v
        return F.linear(x, weight / torch.clamp(sigma / 0.5, min=1.0), bias)

    out = layer(x)
    torch.testing.assert_close(out, manual(layer.weight, layer.bias))
    out.square().sum().backward()
    w = layer.weight.detach().clone().requires_grad_(True)
    manual(w, layer.bias.detach()).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, w.grad)
    assert torch.equal(layer.u, u) and torch.equal(layer.v, v)


def test_power_iteration_between_forward_and_backward_is_safe():
    layer = SpectralNormLinear(4, 3)
    loss = layer(torch.randn(2, 4)).sum()
    update_lipschitz(layer, n_iterations=3)
    loss.backward()
    assert layer.weight.grad is not None


def test_power_iteration_argument_errors():
    layer = SpectralNormLinear(3, 3)
    with pytest.raises(ValueError, match="tol"):
        layer.power_iteration(tol=0.0)
    with pytest.raises(ValueError, match="n_iterations"):
        layer.power_iteration(n_iterations=-1)
    with pytest.raises(ValueError, match="in_features"):
        SpectralNormLinear(0, 3)


@pytest.mark.parametrize("stride,padding,size", [(1, 1, (5, 5)), (1, 0, (5, 6)), (2, 1, (5, 5))])
def test_conv_fft_bound_and_power_iteration_against_dense_matrix(stride, padding, size):
    torch.manual_seed(3)
    weight = torch.randn(3, 2, 3, 3, dtype=F64)
    exact = torch.linalg.matrix_norm(conv_matrix(weight, size, stride, padding), 2).item()
    bound = conv_operator_norm_bound(weight, size, (padding, padding))
    assert bound >= exact * (1 - 1e-12)
    # tight for stride 1; a strided conv keeps a subset of the stride-1 outputs, so the bound is
    # that of the stride-1 operator
    exact_stride1 = torch.linalg.matrix_norm(conv_matrix(weight, size, 1, padding), 2).item()
    assert bound <= 1.5 * exact_stride1
    layer = SpectralNormConv2d(2, 3, 3, stride=stride, padding=padding, coeff=0.9,
                               input_size=size).double()
    with torch.no_grad():
        layer.weight.copy_(weight)
    layer.power_iteration(tol=1e-13, max_iterations=20_000)
    assert layer.sigma_estimate() == pytest.approx(exact, rel=1e-7)
    normalized = conv_matrix(layer.normalized_weight().detach(), size, stride, padding)
    assert torch.linalg.matrix_norm(normalized, 2).item() == pytest.approx(0.9, rel=1e-7)
    assert layer.lipschitz_bound() >= 0.9 * (1 - 1e-9)
    x = torch.randn(2, 2, *size, dtype=F64)
    torch.testing.assert_close(layer(x), F.conv2d(x, layer.normalized_weight(), layer.bias,
                                                   stride=stride, padding=padding))


def test_fft_bound_is_exact_for_1x1_conv():
    torch.manual_seed(4)
    weight = torch.randn(4, 3, 1, 1, dtype=F64)
    bound = conv_operator_norm_bound(weight, (4, 4), (0, 0))
    assert bound == pytest.approx(torch.linalg.matrix_norm(weight[:, :, 0, 0], 2).item(), rel=1e-12)
    # the same map as a 3x3 kernel with only the centre tap goes through the FFT path
    centred = torch.zeros(4, 3, 3, 3, dtype=F64)
    centred[:, :, 1, 1] = weight[:, :, 0, 0]
    assert conv_operator_norm_bound(centred, (4, 4), (1, 1)) == pytest.approx(bound, rel=1e-10)


def test_conv_lazy_state_errors_and_state_dict():
    torch.manual_seed(5)
    layer = SpectralNormConv2d(2, 3, 3)
    assert not layer.has_power_iteration_state()
    assert update_lipschitz(layer, n_iterations=5) == 0  # skipped before the first forward
    with pytest.raises(RuntimeError, match="forward pass first"):
        layer.lipschitz_bound()
    x = torch.randn(2, 2, 6, 6)
    y = layer(x)
    assert layer.input_size == (6, 6)
    assert layer.u.shape == (1, 3, 6, 6) and layer.v.shape == (1, 2, 6, 6)
    with pytest.raises(ValueError, match=r"spatial size \(6, 6\)"):
        layer(torch.randn(2, 2, 8, 8))
    with pytest.raises(ValueError, match="expects input"):
        layer(torch.randn(2, 4, 6, 6))
    copy = SpectralNormConv2d(2, 3, 3)
    copy.load_state_dict(layer.state_dict())
    assert copy.input_size == (6, 6)
    torch.testing.assert_close(copy(x), y)


def test_conv_state_created_in_inference_mode_stays_updatable():
    layer = SpectralNormConv2d(1, 2, 3)
    with torch.inference_mode():
        layer(torch.randn(1, 1, 4, 4))
    assert update_lipschitz(layer, n_iterations=2) == 2


ACTIVATIONS = ["cpila", "clipswish", "crelu", "lipswish", "pila"]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("learnable", [False, True])
def test_jacobian_propagation_matches_autograd(activation, learnable):
    torch.manual_seed(6)
    g = dense_mlp(3, 3, 8, activation, coeff=0.97).double()
    set_learnable_concat(g, learnable)
    with torch.no_grad():
        for layer in g.layers[:-1]:
            layer.K1.fill_(0.3)
            layer.K2.fill_(-0.4)
    w = torch.randn(4, 3, dtype=F64)
    out, jac = g.jacobian(w)
    torch.testing.assert_close(out, g(w))
    expected = torch.autograd.functional.jacobian(lambda z: g(z).sum(0), w).permute(1, 0, 2)
    torch.testing.assert_close(jac, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_no_grad_forward_equals_the_layer_by_layer_map(activation):
    """Without autograd a flat DenseNet writes features into one buffer and folds the concatenation
    scales into cached weights (also for its Jacobian); it must equal the composition of its layers, also after every kind
    of change the cache has to notice (weights, spectral-norm state, scales, the concat flag)."""
    torch.manual_seed(7)
    g = dense_mlp(3, 3, 8, activation, coeff=0.97).double()
    w = torch.randn(6, 3, dtype=F64)

    def by_layer(x):
        with torch.enable_grad():
            for layer in g.layers:
                x = layer(x)
        return x.detach()

    def check():
        with torch.no_grad():
            torch.testing.assert_close(g(w), by_layer(w), rtol=1e-12, atol=1e-13)
        # with autograd the scales are folded into the weights too: same value and gradients
        x = w.clone().requires_grad_(True)
        probe = torch.randn(6, 3, dtype=F64)
        folded = torch.autograd.grad((g(x) * probe).sum(), [x, *g.parameters()], allow_unused=True)
        with torch.enable_grad():
            layered = x
            for layer in g.layers:
                layered = layer(layered)
        reference = torch.autograd.grad((layered * probe).sum(), [x, *g.parameters()], allow_unused=True)
        for mine, theirs in zip(folded, reference):
            assert (mine is None) == (theirs is None)
            if mine is not None:
                torch.testing.assert_close(mine, theirs, rtol=1e-11, atol=1e-12)
            value, jac = g.jacobian(w)  # the same cached weights
        value_grad, jac_grad = g.jacobian(w)  # the scaled weights recomputed with autograd
        torch.testing.assert_close(value, by_layer(w), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(jac, jac_grad.detach(), rtol=1e-12, atol=1e-13)

    check()
    with torch.no_grad():
        g.layers[1].linear.weight.mul_(1.7)  # now above coeff: the normalisation changes
    check()
    update_lipschitz(g, tol=1e-12, max_iterations=200)
    check()
    set_learnable_concat(g, True)
    with torch.no_grad():
        for layer in g.layers[:-1]:
            layer.K1.fill_(0.3)
            layer.K2.fill_(-0.4)
    check()
    with torch.no_grad():
        g.layers[0].K2.fill_(1.2)
        g.layers[-1].bias.add_(0.5)
    check()
    set_learnable_concat(g, False)
    check()


def test_jacobian_is_trainable_like_double_backward():
    torch.manual_seed(7)
    g = dense_mlp(2, 2, 8, "clipswish").double()
    set_learnable_concat(g, True)
    w = torch.randn(3, 2, dtype=F64)
    params = list(g.parameters())

    def loss_from(jac):
        return torch.logdet(torch.eye(2, dtype=F64) + jac).sum()

    grads = torch.autograd.grad(loss_from(g.jacobian(w)[1]), params, materialize_grads=True)
    jac_auto = torch.autograd.functional.jacobian(lambda z: g(z).sum(0), w, create_graph=True)
    grads_auto = torch.autograd.grad(loss_from(jac_auto.permute(1, 0, 2)), params,
                                     materialize_grads=True)
    for a, b in zip(grads, grads_auto):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_jacobian_rejects_images():
    g = dense_convnet(2, 1, 4)
    with pytest.raises(ValueError, match="flat"):
        g.jacobian(torch.randn(2, 2, 4, 4))


def test_learnable_concat_gives_every_parameter_a_gradient():
    g = dense_mlp(2, 3, 16, "clipswish")
    g(torch.randn(8, 2)).square().sum().backward()
    frozen = {name for name, p in g.named_parameters() if p.grad is None}
    assert frozen == {f"layers.{i}.{k}" for i in range(3) for k in ("K1", "K2")}
    g.zero_grad(set_to_none=True)
    assert set_learnable_concat(g, True) == 3
    g(torch.randn(8, 2)).square().sum().backward()
    for name, p in g.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_etas_have_norm_lip_coeff():
    layer = dense_mlp(2, 1, 4, lip_coeff=0.9).layers[0]
    e1, e2 = layer.etas()
    assert math.hypot(e1, e2) == pytest.approx(0.9)
    assert e1 == pytest.approx(e2)
    set_learnable_concat(layer, True)
    with torch.no_grad():
        layer.K1.fill_(2.0)
    e1, e2 = layer.etas()
    assert math.hypot(e1.item(), e2.item()) == pytest.approx(0.9)
    ratio = (math.log1p(math.exp(2.0)) + 0.1) / (math.log1p(math.exp(1.0)) + 0.1)
    assert (e1 / e2).item() == pytest.approx(ratio)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_certificate_bounds_empirical_lipschitz_mlp(activation):
    torch.manual_seed(8)
    g = dense_mlp(3, 3, 8, activation, coeff=0.97).double()
    set_learnable_concat(g, True)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(0.5 * torch.randn_like(p))
    update_lipschitz(g, tol=1e-10, max_iterations=2000)
    (cert,) = certify_lipschitz(g)
    assert isinstance(cert, LipschitzCertificate)
    assert cert.bound == pytest.approx(g.lipschitz_bound())
    assert cert.holds == (cert.bound < 1)
    a = torch.randn(2000, 3, dtype=F64)
    b = a + 0.3 * torch.randn(2000, 3, dtype=F64)
    ratios = (g(a) - g(b)).norm(dim=1) / (a - b).norm(dim=1)
    assert ratios.max().item() <= cert.bound
    jac = g.jacobian(a[:500])[1]
    assert torch.linalg.matrix_norm(jac, 2).max().item() <= cert.bound
    assert cert.estimate_from_power_iteration == pytest.approx(cert.bound, rel=1e-6)


def test_certificate_bounds_empirical_lipschitz_convnet():
    torch.manual_seed(9)
    g = dense_convnet(2, 2, 4, "cpila", coeff=0.98, input_size=(5, 5)).double()
    update_lipschitz(g, tol=1e-10, max_iterations=5000)
    (cert,) = certify_lipschitz(g)
    assert cert.holds
    a = torch.randn(300, 2, 5, 5, dtype=F64)
    b = a + 0.2 * torch.randn_like(a)
    ratios = (g(a) - g(b)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
    assert ratios.max().item() <= cert.bound
    full_jac = torch.autograd.functional.jacobian(lambda z: g(z), a[:1]).reshape(50, 50)
    assert torch.linalg.matrix_norm(full_jac, 2).item() <= cert.bound
    assert cert.estimate_from_power_iteration <= cert.bound * (1 + 1e-9)


def test_certificate_catches_stale_power_iteration():
    """Perturb the weight orthogonally to u v^T: the power-iteration estimate does not move but
    the true norm does, and only the independent certificate sees it."""
    torch.manual_seed(10)
    g = dense_mlp(2, 1, 4, "cpila", coeff=0.97)
    (before,) = certify_lipschitz(g)
    assert before.holds
    layer = g.layers[-1]
    with torch.no_grad():
        noise = 20 * torch.randn_like(layer.weight)
        noise -= (layer.u @ noise @ layer.v) * torch.outer(layer.u, layer.v)
        layer.weight.add_(noise)
    (after,) = certify_lipschitz(g)
    assert not after.holds
    assert after.bound > 1.5 * after.estimate_from_power_iteration
    update_lipschitz(g, tol=1e-8, max_iterations=1000)
    assert certify_lipschitz(g)[0].holds


def test_certify_finds_every_g_in_a_model():
    model = torch.nn.ModuleDict({"a": dense_mlp(2, 1, 4), "b": dense_mlp(2, 2, 4, "clipswish")})
    names = [c.name for c in certify_lipschitz(model)]
    assert names == ["a", "b"]


def test_update_lipschitz_returns_max_iterations():
    g = dense_mlp(2, 2, 4)
    assert update_lipschitz(g, n_iterations=5) == 5
    assert 1 <= update_lipschitz(g, tol=1e-3) <= 200


def test_batched_power_iteration_equals_per_layer_iteration():
    # update_lipschitz(n_iterations=k) runs same-shaped linear layers as one batch; the oracle
    # is each layer's own power_iteration(k) in float64
    torch.manual_seed(3)
    model = torch.nn.ModuleList([dense_mlp(2, 2, 8) for _ in range(3)] + [dense_convnet(2, 1, 4, input_size=(4, 4))]).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    assert update_lipschitz(model, n_iterations=4) == 4
    batched = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(reference)
    for layer in model.modules():
        if isinstance(layer, (SpectralNormLinear, SpectralNormConv2d)):
            layer.power_iteration(4)
    for key, value in model.state_dict().items():
        assert torch.allclose(batched[key], value, atol=1e-12), key
    changed = [k for k in reference if k.endswith(".u") and not torch.allclose(reference[k], batched[k])]
    assert changed, "the power iteration should have moved the vectors"


def test_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="unknown activation"):
        dense_mlp(2, 3, 16, "relu6")
    with pytest.raises(ValueError, match="even"):
        dense_mlp(2, 3, 15, "cpila")
    with pytest.raises(ValueError, match="depth"):
        dense_mlp(2, -1, 16)
    with pytest.raises(ValueError, match="lacks"):
        dense_mlp(2, 1, 4, lambda: torch.nn.ReLU())
    with pytest.raises(ValueError, match="too small"):
        SpectralNormConv2d(1, 1, 5, padding=0)(torch.randn(1, 1, 3, 3))


def test_reused_parameter_transforms_give_the_same_gradients():
    # a flow pass computes each normalised weight and each pair of scales once; gradients must
    # equal those of recomputing them at every use, and accumulating over two passes must work
    from monoflow.flows import Flow
    from monoflow.blocks import MonotoneBlock
    from monoflow.lipschitz import reuse_parameter_transforms

    torch.manual_seed(0)
    g = dense_mlp(2, 2, 8, coeff=0.9)
    set_learnable_concat(g, True)
    flow = Flow([MonotoneBlock(g)], event_shape=(2,)).double()
    x = torch.randn(16, 2, dtype=F64)
    layer = g.layers[0].linear
    with reuse_parameter_transforms():
        assert layer.normalized_weight() is layer.normalized_weight()
        assert g.layers[0].etas()[0] is g.layers[0].etas()[0]
    assert layer.normalized_weight() is not layer.normalized_weight()  # outside: recomputed

    flow.zero_grad()
    flow.log_prob(x).mean().backward()
    reused = [p.grad.clone() for p in flow.parameters()]
    flow.log_prob(x).mean().backward()  # accumulate: a second pass, no optimiser step
    accumulated = [p.grad.clone() for p in flow.parameters()]

    import monoflow.lipschitz as lipschitz
    original = lipschitz.reuse_parameter_transforms
    import monoflow.flows as flows
    flows.reuse_parameter_transforms = contextlib.nullcontext  # recompute at every use
    try:
        flow.zero_grad()
        flow.log_prob(x).mean().backward()
    finally:
        flows.reuse_parameter_transforms = original
    for a, b, c in zip(reused, accumulated, [p.grad for p in flow.parameters()]):
        assert torch.allclose(a, c, atol=1e-12)
        assert torch.allclose(b, 2 * c, atol=1e-12)


def test_lipschitz_chain_jacobian_equals_autograd(float64):
    """Residual Flow's g propagates its Jacobian forwards: value and Jacobian against autograd."""
    from monoflow.lipschitz import LipschitzChain
    from monoflow.models.toy import lipswish_mlp

    torch.manual_seed(7)
    g = lipswish_mlp(3, [11, 9], coeff=0.9)
    assert isinstance(g, LipschitzChain)
    with torch.no_grad():
        for name, parameter in g.named_parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))  # beta away from its initial value too
    w = torch.randn(6, 3)
    value, jac = g.jacobian(w)
    assert torch.allclose(value, g(w), atol=1e-12)
    expected = torch.stack([torch.autograd.functional.jacobian(g, row[None])[0, :, 0] for row in w])
    assert torch.allclose(jac, expected, atol=1e-10)
    # differentiable in the parameters: LipSwish's b against finite differences of the Jacobian's sum
    beta = g[1].b
    (grad,) = torch.autograd.grad(g.jacobian(w)[1].sum(), beta)
    eps = 1e-6
    with torch.no_grad():
        beta.add_(eps)
        up = g.jacobian(w)[1].sum()
        beta.sub_(2 * eps)
        down = g.jacobian(w)[1].sum()
        beta.add_(eps)
    assert float(grad) == pytest.approx(float((up - down) / (2 * eps)), rel=1e-5, abs=1e-8)
    with pytest.raises(ValueError, match="flat inputs"):
        g.jacobian(torch.randn(2, 3, 1))
    with pytest.raises(ValueError, match="Dropout"):
        LipschitzChain(torch.nn.Dropout()).jacobian(w)


@pytest.mark.parametrize("stride,padding,size", [(1, 1, (4, 4)), (1, 0, (5, 6)), (2, 1, (5, 5))])
def test_dense_conv_norm_is_the_operator_norm_and_tighter_than_fft(stride, padding, size):
    from monoflow.lipschitz import conv_operator_norm_exact

    torch.manual_seed(7)
    weight = torch.randn(5, 3, 3, 3, dtype=F64)
    exact = torch.linalg.matrix_norm(conv_matrix(weight, size, stride, padding), 2).item()  # independent oracle
    dense = conv_operator_norm_exact(weight, size, (padding, padding), stride)
    assert dense == pytest.approx(exact, rel=1e-8) and dense >= exact
    assert dense <= conv_operator_norm_bound(weight, size, (padding, padding)) * (1 + 1e-9)
    assert conv_operator_norm_exact(weight, size, (padding, padding), stride, limit=10) is None  # too large


def test_small_conv_layers_certify_below_one_where_the_fft_bound_does_not():
    """4x4 inputs: the FFT bound of a layer normalised to 0.98 exceeds 1, its exact norm does not."""
    torch.manual_seed(8)
    layer = SpectralNormConv2d(16, 16, 3, coeff=0.98, input_size=(4, 4)).double()
    layer.power_iteration(tol=1e-12, max_iterations=20_000)
    weight = layer.normalized_weight().detach()
    exact = torch.linalg.matrix_norm(conv_matrix(weight, (4, 4), 1, 1), 2).item()
    assert exact == pytest.approx(0.98, rel=1e-6)
    assert conv_operator_norm_bound(weight, (4, 4), (1, 1)) > 1.0  # the loose circular bound
    assert layer.lipschitz_bound() == pytest.approx(exact, rel=1e-8) and layer.lipschitz_bound() < 1.0


def test_no_grad_weights_are_checked_once_per_pass_and_again_after_it():
    """Inside a flow pass the folded no-grad weights are computed once (parameters cannot change
    there); a parameter changed between passes gives new weights in the next pass."""
    from monoflow.lipschitz import reuse_parameter_transforms

    torch.manual_seed(3)
    g = dense_mlp(2, 2, 8, coeff=0.9).double()
    set_learnable_concat(g, True)
    w = torch.randn(5, 2, dtype=F64)
    with torch.no_grad(), reuse_parameter_transforms():
        assert g._column_scaled_weights(2) is g._column_scaled_weights(2)
        before = g(w)
    with torch.no_grad():
        g.layers[0].K2.add_(0.7)
        g.layers[1].linear.weight.mul_(0.5)
    with torch.no_grad(), reuse_parameter_transforms():
        after = g(w)
    with torch.enable_grad():
        expected = w
        for layer in g.layers:
            expected = layer(expected)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected.detach(), rtol=1e-12, atol=1e-13)


def test_a_training_pass_computes_the_folded_weights_once(monkeypatch):
    """In a pass with autograd on, the solves' no-grad weights are the detached differentiable
    ones: one computation of the folded weights per g and pass instead of two, the same values,
    and the same gradients as a pass that computes them separately."""
    from monoflow.blocks import MonotoneBlock
    from monoflow.flows import Flow
    from monoflow.lipschitz.dense import DenseNet

    torch.manual_seed(2)
    g = dense_mlp(2, 2, 8, coeff=0.9)
    set_learnable_concat(g, True)
    flow = Flow([MonotoneBlock(g)], event_shape=(2,)).double()
    x = torch.randn(32, 2, dtype=F64)
    calls = []
    original = DenseNet._scaled_weights
    monkeypatch.setattr(DenseNet, "_scaled_weights", lambda self, width: calls.append(width) or original(self, width))
    flow.log_prob(x).mean().backward()
    assert len(calls) == 1
    shared = [p.grad.clone() for p in flow.parameters()]

    flow.zero_grad()
    monkeypatch.setattr("monoflow.lipschitz.dense.pass_records_graph", lambda: False)  # the no-grad weights apart
    calls.clear()
    flow.log_prob(x).mean().backward()
    assert len(calls) == 2
    for mine, separate in zip(shared, [p.grad for p in flow.parameters()]):
        torch.testing.assert_close(mine, separate, rtol=1e-12, atol=1e-14)
