"""Multi-scale image flow: exact parameter counts of every paper preset, log-dets, inverses, bpd."""
import math

import pytest
import torch
from torch.autograd.functional import jacobian

from monoflow.models.image import (MODEL_VARIANTS, count_parameters, get_image_preset, image_flow,
                                   list_image_presets)

# SPEC.md section 4 (the paper's released models)
PAPER_COUNTS = {
    "mnist": 20_872_826,
    "cifar10": 24_894_430,
    "imagenet32": 46_980_574,
    "imagenet64": 48_907_888,
    "cifar10-ablation-1": 24_894_586,  # i-DenseNet
    "cifar10-ablation-4": 24_894_430,  # Monotone Flow
    "cifar10-vardeq": 46_891_648,
}


@pytest.mark.parametrize("name,count", sorted(PAPER_COUNTS.items()))
def test_paper_parameter_counts(name, count):
    assert count_parameters(image_flow(name)) == count
    assert get_image_preset(name).paper_params == count


def test_every_preset_builds():
    names = list_image_presets()
    expected = {"mnist", "cifar10", "imagenet32", "imagenet64", "cifar10-vardeq", "imagenet32-vardeq", "digits"}
    expected |= {f"cifar10-ablation-{i}" for i in range(1, 5)}
    expected |= {f"cifar10-classify-{s}-{m}" for s in ("tiny", "small", "large") for m in ("monotone", "idensenet")}
    assert expected <= set(names)
    counts = {}
    for name in names:
        preset = get_image_preset(name)
        counts[name] = count_parameters(image_flow(name))
        assert counts[name] > 0
        if preset.paper_params is not None:
            assert counts[name] == preset.paper_params, name
    # ablation rows differ only by one LipSwish beta per activation (156 of them)
    assert counts["cifar10-ablation-3"] - counts["cifar10-ablation-4"] == 156
    assert counts["cifar10-ablation-2"] == counts["cifar10-ablation-4"]
    assert counts["imagenet32-vardeq"] - counts["imagenet32"] == counts["cifar10-vardeq"] - counts["cifar10"]
    sizes = [counts[f"cifar10-classify-{s}-monotone"] for s in ("tiny", "small", "large")]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3


def test_preset_lookup_errors():
    with pytest.raises(ValueError, match="unknown image preset"):
        image_flow("cifar100")
    with pytest.raises(ValueError, match="unknown model"):
        image_flow("digits", model="glow")
    with pytest.raises(ValueError, match="unknown ImageFlowConfig fields"):
        image_flow("digits", nonsense=1)
    with pytest.raises(ValueError, match="divisible"):
        image_flow("digits", blocks=(1, 1, 1, 1, 1))
    assert image_flow("digits", model="idensenet").config.block == "residual"
    assert set(MODEL_VARIANTS) == {"monotone", "idensenet", "residual-cpila", "monotone-clipswish", "resflow"}


TINY = dict(image_shape=(1, 4, 4), blocks=(1, 1), growth=8, depth=2, fc_blocks=1, fc_first=8, fc_growth=8,
            logdet="exact", n_levels=17)


@pytest.mark.parametrize("variant", [
    dict(),
    dict(factor_out=True),
    dict(squeeze_first=True, blocks=(1,)),
    dict(block="residual", activation="clipswish"),
    dict(fc_end=False, actnorm=False),
    dict(block="residual", activation="lipswish", resflow_hidden=6),  # Residual Flow's chain g
])
def test_flow_logdet_and_inverse(variant):
    """The summed log-det of the whole multi-scale flow equals slogdet of its autograd Jacobian."""
    torch.manual_seed(0)
    model = image_flow("digits", **{**TINY, **variant}).double()
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64) * 0.9 + 0.05
    with torch.no_grad():
        model(x, with_logdet=False)  # ActNorm initialisation
    model.eval()
    z, logdet = model(x)
    assert z.shape == (3, 16)
    reference = torch.stack([
        torch.linalg.slogdet(jacobian(lambda v: model(v.view(1, 1, 4, 4))[0].view(-1), x[i].view(-1)))[1]
        for i in range(3)
    ])
    torch.testing.assert_close(logdet.detach(), reference, rtol=1e-7, atol=1e-7)
    x_back, inverse_logdet = model.inverse(z.detach())
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-8)
    torch.testing.assert_close(inverse_logdet, -logdet.detach(), rtol=0, atol=1e-7)


def test_bits_per_dim_formula():
    torch.manual_seed(1)
    model = image_flow("digits", **TINY).double().eval()
    k = torch.randint(0, 17, (4, 1, 4, 4))
    noise = torch.rand(4, 1, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        model((k + noise) / 17, with_logdet=False)
        bpd = model.bits_per_dim(k, noise=noise)
        z, logdet = model((k + noise) / 17)
    log_pz = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(1)
    expected = -(log_pz + logdet - 16 * math.log(17)) / (16 * math.log(2))
    torch.testing.assert_close(bpd, expected)


def test_roulette_estimate_matches_exact_on_average():
    """The image model's default (Russian roulette, 20 exact terms in eval) agrees with the exact log-det."""
    torch.manual_seed(2)
    exact = image_flow("digits", **TINY).double()
    roulette = image_flow("digits", **{**TINY, "logdet": "russian_roulette"}).double()
    x = torch.rand(8, 1, 4, 4, dtype=torch.float64) * 0.9 + 0.05
    with torch.no_grad():
        exact(x, with_logdet=False)
    roulette.load_state_dict(exact.state_dict())
    exact.eval(), roulette.eval()
    with torch.no_grad():
        reference = exact(x)[1]
        estimates = torch.stack([roulette(x)[1] for _ in range(20)]).mean(0)
    # Hutchinson noise only (the series itself is summed to 20+ terms): a few percent of |logdet|
    assert torch.allclose(estimates, reference, atol=0.1 * reference.abs().max().item())


def test_sampling_and_classifier_shapes():
    torch.manual_seed(3)
    model = image_flow("digits", **TINY).eval()
    with torch.no_grad():
        model(torch.rand(5, 1, 4, 4), with_logdet=False)
    images = model.sample(6, generator=torch.Generator().manual_seed(0))
    assert images.shape == (6, 1, 4, 4) and images.min() >= 0 and images.max() <= 1
    assert torch.allclose(images * 16, (images * 16).round(), atol=1e-5)  # on the 17-level grid
    with pytest.raises(ValueError, match="density"):
        model.classify(torch.rand(2, 1, 4, 4))
    clf = image_flow("digits", **{**TINY, "task": "classification", "preprocessing": "normalize",
                                  "classification_hidden": 8, "n_classes": 3})
    logits = clf.classify(torch.rand(2, 1, 4, 4))
    assert logits.shape == (2, 3)
    assert clf(torch.rand(2, 1, 4, 4))[1] is not None  # classification models still run as flows


def test_variational_dequantization_in_model():
    torch.manual_seed(4)
    model = image_flow("digits", **{**TINY, "dequantization": "variational", "logdet": "russian_roulette",
                                    "vardeq_blocks": 1, "vardeq_cond_channels": 16, "vardeq_hidden": 16,
                                    "vardeq_bottlenecks": 1})
    k = torch.randint(0, 17, (3, 1, 4, 4))
    bpd = model.bits_per_dim(k)
    assert bpd.shape == (3,) and torch.isfinite(bpd).all()
    bpd.mean().backward()
    conditioner = model.dequantizer.blocks[0].g.conditioner
    assert conditioner[0].weight.grad is not None and conditioner[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="uniform"):
        model.bits_per_dim(k, noise=torch.rand(3, 1, 4, 4))


def test_solver_rtols_reach_both_solves_and_trade_evaluations_for_residual():
    """``solver_rtol`` and ``adjoint_rtol`` reach every monotone block's forward and adjoint solve:
    a looser stop takes fewer evaluations of g, and each solution still meets its tolerance."""
    from monoflow.blocks import MonotoneBlock, solver_stats

    with pytest.raises(ValueError, match="solver_rtol"):
        image_flow("digits", **TINY, solver_rtol=1.5)
    with pytest.raises(ValueError, match="adjoint_rtol"):
        image_flow("digits", **TINY, adjoint_rtol=-1e-3)
    stats = {}
    for rtol in (0.0, 1e-2):
        torch.manual_seed(3)
        model = image_flow("digits", **{**TINY, "solver_rtol": rtol, "adjoint_rtol": rtol})
        blocks = [m for m in model.modules() if isinstance(m, MonotoneBlock)]
        assert blocks and all((b.solver.rtol, b.adjoint.rtol if b.adjoint else None)
                              == ((1e-2, 1e-2) if rtol else (None, None)) for b in blocks)
        x = torch.rand(16, 1, 4, 4) * 0.9 + 0.05
        with torch.no_grad():
            model(x, with_logdet=False)
        model.train()
        model(x)[1].sum().backward()
        stats[rtol] = solver_stats(model)
        assert stats[rtol]["forward_converged_fraction"] == 1.0
        assert stats[rtol]["adjoint_converged_fraction"] == 1.0
    assert stats[1e-2]["forward_evaluations"] < stats[0.0]["forward_evaluations"]
    assert stats[1e-2]["adjoint_evaluations"] < stats[0.0]["adjoint_evaluations"]
