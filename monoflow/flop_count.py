r"""A step's arithmetic floor: the FLOPs of its matrix products and the machine's matmul throughput.

:func:`count_flops` runs a function under a dispatch mode that sums torch's own FLOP formulas
(``torch.utils.flop_counter.flop_registry``: matrix products, batched products, convolutions; and
here matrix-vector products, which the registry leaves out) over every operator it dispatches,
forward or backward; elementwise work is not counted.
:func:`matmul_flops_per_second` measures the device's float32 matrix-multiply throughput, and
:func:`arithmetic_floor` divides the one by the other: the time a step would take if it did nothing
but its matrix products at that throughput, and how many times that the measured step takes.
:func:`g_flops_of_blocks` counts one evaluation of every block's g, the unit in which a phase's
FLOPs become *evaluations of g per block*. The image benchmark
(:func:`monoflow.images.benchmark.step_cost`) and the toy benchmarks (``benchmarks/``) count with
these.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

__all__ = ["flop_counting_mode", "count_flops", "count_step_flops", "matmul_flops_per_second", "arithmetic_floor",
           "blocks_and_inputs", "g_flops_of_blocks", "synchronize"]


def _vector_product_flops(matrix: torch.Tensor, vector: torch.Tensor, *args: Any, **kwargs: Any) -> int:
    """``matrix @ vector`` (``aten.mv``): two FLOPs per entry of the matrix (the power iterations)."""
    return 2 * matrix.numel()


def flop_counting_mode():
    """A dispatch mode whose ``flops`` sums the FLOPs of the matrix products and convolutions
    dispatched while it is active: torch's formulas (``torch.utils.flop_counter.flop_registry``),
    and matrix-vector products, which that registry leaves out. ``FlopCounterMode`` itself tracks
    modules with hooks that ``torch.autograd.grad`` inside a forward (the log-det estimators) does
    not support, so only its formulas are used here."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    formulas = {**flop_registry, torch.ops.aten.mv: _vector_product_flops}

    class _CountFlops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = formulas.get(func._overloadpacket)
            if formula is not None:
                self.flops += int(formula(*args, **kwargs, out_val=out))
            return out

    return _CountFlops()


def count_flops(fn: Callable[[], Any]) -> Tuple[int, Any]:
    """``(FLOPs, fn())``: the FLOPs of the matrix products and convolutions ``fn()`` dispatches
    (:func:`flop_counting_mode`), backward passes run inside ``fn`` included. Eager code only: a
    compiled graph's kernels are not dispatched one by one."""
    with flop_counting_mode() as counter:
        result = fn()
    return counter.flops, result


def count_step_flops(loss: Callable[[], torch.Tensor], update: Callable[[], Any]) -> Dict[str, int]:
    """FLOPs of one training step by phase: ``forward`` (``loss()``), ``backward`` (its
    ``backward()``) and ``update`` (``update()``: the optimiser's step and the power iterations),
    and their sum, ``step``. The step really runs: the parameters change as in training."""
    forward, value = count_flops(loss)
    backward, _ = count_flops(value.backward)
    update_flops, _ = count_flops(update)
    return {"forward": forward, "backward": backward, "update": update_flops,
            "step": forward + backward + update_flops}


def synchronize(device: Any) -> None:
    """Wait for a CUDA device's queued work (nothing to do on a CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops_per_second(device: Any = "cpu", size: Optional[int] = None, repeats: int = 5) -> float:
    """Measured float32 matrix-multiply throughput of ``device`` with torch's current thread count:
    ``2 size^3`` over the best of ``repeats`` products of two ``size x size`` matrices (default
    4096 on a GPU, 1024 on a CPU)."""
    device = torch.device(device)
    size = size or (4096 if device.type == "cuda" else 1024)
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def arithmetic_floor(seconds: float, flops: float, flops_per_s: float) -> Dict[str, float]:
    """``floor_s = flops / flops_per_s`` (the step's matrix products at the measured matmul
    throughput, nothing else) and ``times_above_floor = seconds / floor_s``."""
    floor = flops / flops_per_s
    return {"floor_s": floor, "times_above_floor": seconds / floor if floor > 0 else float("inf")}


def blocks_and_inputs(flow: torch.nn.Module, x: torch.Tensor) -> Tuple[list, Dict[int, torch.Tensor]]:
    """``(blocks, inputs)``: the flow's monotone / residual blocks and the input each sees, from
    one no-grad pass ``flow(x, with_logdet=False)`` (which also initialises ActNorm and the
    power-iteration state of an image flow)."""
    from monoflow.blocks import MonotoneBlock, ResidualBlock

    blocks = [m for m in flow.modules() if isinstance(m, (MonotoneBlock, ResidualBlock))]
    inputs: Dict[int, torch.Tensor] = {}
    hooks = [b.register_forward_pre_hook(lambda mod, args, i=i: inputs.setdefault(i, args[0].detach()))
             for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            flow(x, with_logdet=False)
    finally:
        for hook in hooks:
            hook.remove()
    return blocks, inputs


def g_flops_of_blocks(blocks: Sequence[torch.nn.Module], inputs: Dict[int, torch.Tensor]) -> int:
    """FLOPs of one no-grad evaluation of every block's g at that block's input
    (:func:`blocks_and_inputs`): the unit of *evaluations of g per block*."""
    def one_g_each() -> None:
        with torch.no_grad():
            for i, block in enumerate(blocks):
                w = inputs[i]
                block.g(w.flatten(1) if w.dim() == 2 else w)

    return count_flops(one_g_each)[0]
