"""The shared FLOP counter (monoflow.flop_count) against counts made by hand."""
import pytest
import torch

from monoflow.flop_count import (arithmetic_floor, blocks_and_inputs, count_flops, count_step_flops,
                                 g_flops_of_blocks, matmul_flops_per_second)


def test_a_matrix_product_is_two_m_n_k():
    a, b = torch.randn(30, 40), torch.randn(40, 50)
    flops, product = count_flops(lambda: a @ b)
    assert flops == 2 * 30 * 40 * 50
    assert torch.equal(product, a @ b)
    assert count_flops(lambda: torch.randn(7, 5) @ torch.randn(5))[0] == 2 * 7 * 5  # matrix-vector
    assert count_flops(lambda: torch.randn(4, 3, 6) @ torch.randn(4, 6, 2))[0] == 2 * 4 * 3 * 6 * 2  # batched
    assert count_flops(lambda: (a.exp() + 1).sum())[0] == 0  # elementwise work is not counted


def test_a_linear_layer_forward_and_backward():
    """Forward 2 B n_in n_out; backward the same twice (input and weight gradients)."""
    layer, x = torch.nn.Linear(40, 7), torch.randn(30, 40, requires_grad=True)
    forward = 2 * 30 * 40 * 7
    assert count_flops(lambda: layer(x))[0] == forward
    assert count_flops(lambda: layer(x).sum().backward())[0] == 3 * forward

    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    weight = layer.weight.detach().clone()
    phases = count_step_flops(lambda: layer(x).square().mean(), optimizer.step)
    assert phases == {"forward": forward, "backward": 2 * forward, "update": 0, "step": 3 * forward}
    assert not torch.equal(layer.weight, weight)  # the step ran


def test_one_evaluation_of_every_g_of_a_flow():
    """Toy Monotone Flow: g is a DenseNet of 2 inputs; its linear maps' FLOPs summed by hand."""
    from monoflow.lipschitz.spectral_norm import SpectralNormLinear
    from monoflow.models.toy import toy_flow

    flow = toy_flow("monotone", nblocks=2, depth=2, growth=4)
    x = torch.randn(16, 2)
    blocks, inputs = blocks_and_inputs(flow, x)
    assert len(blocks) == 2 and sorted(inputs) == [0, 1]
    by_hand = sum(2 * 16 * m.in_features * m.out_features for block in blocks
                  for m in block.g.modules() if isinstance(m, SpectralNormLinear))
    assert g_flops_of_blocks(blocks, inputs) == by_hand > 0


def test_floor_and_throughput():
    assert arithmetic_floor(0.5, 2e9, 1e10) == pytest.approx({"floor_s": 0.2, "times_above_floor": 2.5})
    assert 1e8 < matmul_flops_per_second("cpu", size=128, repeats=2) < 1e14
