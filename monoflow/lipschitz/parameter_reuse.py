"""Computing each parameter transform (a normalised weight, a pair of dense-layer scales) once
per flow pass: :func:`reuse_parameter_transforms`, and version keys that tell when a cached
transform of a parameter is stale."""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Hashable, Tuple

import torch

__all__ = ["reuse_parameter_transforms", "reused_transform", "pass_records_graph"]

_PASS = threading.local()


@contextlib.contextmanager
def reuse_parameter_transforms():
    r"""Within this context every normalised weight :math:`W/\max(1, \sigma/c)` and every pair of
    dense-layer scales is computed once with autograd and then reused.

    A flow pass evaluates each g several times with the same parameters (the graph evaluation at
    a fixed point and the Jacobian pass of the log-det); :class:`monoflow.flows.Flow` opens this
    context around its passes. Parameters and power-iteration vectors must not change inside it.
    Nested contexts share the outermost cache."""
    outermost = getattr(_PASS, "cache", None) is None
    if outermost:
        _PASS.cache = {}
        _PASS.records_graph = torch.is_grad_enabled()
    try:
        yield
    finally:
        if outermost:
            _PASS.cache = None
            _PASS.records_graph = False


def pass_records_graph() -> bool:
    """Whether a :func:`reuse_parameter_transforms` pass is open and was opened with autograd on:
    its solves (run without autograd) and its graph evaluations then use the same transforms,
    which can be computed once with autograd and detached for the solves."""
    return getattr(_PASS, "cache", None) is not None and getattr(_PASS, "records_graph", False)


def reused_transform(owner: object, name: Hashable, compute: Callable[[], object]):
    """``compute()``, or its value from earlier in the same :func:`reuse_parameter_transforms`."""
    if torch.compiler.is_compiling():
        # a compiled graph shares values itself; and reading _PASS here would make the graph
        # depend on it (a guard), so the first eager pass after compiling would compile again
        return compute()
    cache = getattr(_PASS, "cache", None)
    if cache is None:
        return compute()
    key = (id(owner), name)
    if key not in cache:
        cache[key] = (owner, compute())  # holding owner keeps id(owner) unique while cached
    return cache[key][1]


def _version_key(*tensors: torch.Tensor) -> Tuple[Tuple[int, int, int], ...]:
    """Identifies the current contents of tensors: in-place updates bump ``_version``."""
    return tuple((id(t), t.data_ptr(), t._version) for t in tensors)
