r"""A flat flow's training loss as compiled graphs (``torch.compile``).

The eager blocks dispatch thousands of small operators per iteration on the 2-D toy models
(solves to a tolerance, a log-det pass, their gradients), and at that size dispatching costs as
much as computing. :class:`CompiledFlowLoss` computes the same loss,
:math:`-\frac1B\sum_i \log p(x_i)`, without data-dependent control flow, so that
``torch.compile`` captures all of it, forward and backward, in one graph per group of
``blocks_per_graph`` consecutive blocks (compiled once, reused by every group):

* :class:`~monoflow.blocks.MonotoneBlock`: the solve :math:`w + g(w) = b = \sqrt2\,x` by
  ``newton_steps`` Newton steps from :math:`w = b` without autograd,
  :math:`w \leftarrow w - (I + J(w))^{-1}(w + g(w) - b)`, to :math:`w_n`; then, with autograd, one
  more step :math:`w^\star = w_n - (I + J)^{-1}(w_n + g(w_n) - b)` with :math:`J = J(w_n)` held
  constant. Its value is the solution and its derivatives in :math:`b` and in the parameters are
  the implicit ones, :math:`(I+J)^{-1}` and :math:`-(I+J)^{-1}\partial g/\partial\theta`. One
  pass at :math:`w^\star` gives :math:`\log|\det F'| = \log|\det(I-J)| - \log|\det(I+J)|`, as
  the eager block, and the residual :math:`\|w^\star + g(w^\star) - b\|` that is checked.
* :class:`~monoflow.blocks.ResidualBlock`: :math:`y = x + g(x)`, :math:`\log|\det(I + J(x))|`.

:class:`CompiledUpdate` compiles what follows the backward pass: the optimiser's step and the power
iterations of every spectral norm (``update_lipschitz``), a few hundred more small operators.

On a CPU with the fused kernels built (:mod:`monoflow.kernels`), every CPila DenseNet g (Monotone
Flow's) calls them inside the graphs as three torch operators (``monoflow::dense``, its backward and
``monoflow::dense_newton``, :mod:`monoflow.lipschitz.dense_fused`), where Inductor would otherwise
generate a dozen small matrix products and elementwise kernels per evaluation; the same math.

Supported: flows of these blocks whose g propagates Jacobians (``DenseNet`` from ``dense_mlp``,
``LipschitzChain`` from ``lipswish_mlp``) with ``logdet="exact"``: the 2-D toy models Monotone
Flow, i-DenseNet and Residual Flow. Every solve's
residual is checked against the solver's tolerance; a batch where one misses it is recomputed by
the eager flow (counted in ``fallbacks``), so the loss is never that of an unconverged solve.

Compiling is paid once per machine: torch keeps what Inductor generated (its FX graph cache and
AOTAutograd's cache, both on by default) in ``TORCHINDUCTOR_CACHE_DIR``, whose default under
``/tmp`` does not survive a reboot. Unless the user set that variable to another folder,
:class:`CompiledFlowLoss` and :class:`CompiledUpdate` set it before they compile to
:func:`compile_cache_dir`'s ``~/.cache/monoflow/torch_compile`` (under ``$XDG_CACHE_HOME`` when
that is set), so a later run of the same architecture, in another process, loads the compiled
graphs instead of generating them again. Dynamo still traces the
Python code in every process, and AOTAutograd traces again a graph that holds custom autograd
Functions (Monotone Flow's CPila), which torch does not cache by default
(``benchmarks/compiled_loss_speed.py --compile-cache`` measures a first and a second process).
Set ``TORCHINDUCTOR_CACHE_DIR`` to keep the caches elsewhere.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from typing import Hashable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from monoflow import kernels
from monoflow.activations import CPila
from monoflow.blocks import MonotoneBlock, ResidualBlock
from monoflow.implicit import newton_start, solve_small
from monoflow.lipschitz import DenseNet, LipschitzChain, LipschitzDenseLayer, dense_fused, update_lipschitz
from monoflow.logdet import ExactLogDet
from monoflow.solvers import SolverInfo, default_tolerances

__all__ = ["CompiledFlowLoss", "CompiledUpdate", "DEFAULT_NEWTON_STEPS", "DEFAULT_BLOCKS_PER_GRAPH", "compile_cache_dir",
           "newton_resolvent"]


#: Newton converges quadratically: from w = b, 3 steps and the differentiable one reach float32
#: precision on the paper's toy Monotone Flow over whole runs. 2 do not: on checkerboard they keep
#: every sample within the tolerance up to about 17,500 of 50,000 iterations, then miss it on up to
#: 0.08% of samples, and a batch with one such sample is recomputed by the eager flow
#: (benchmarks/newton_steps.py; benchmarks/results/newton_steps.json)
DEFAULT_NEWTON_STEPS = 3

#: blocks per compiled graph: for the 10-block toy Monotone Flow, a first process compiled groups of 2
#: in 230 s against 477 s for one graph of the whole flow, a second (warm cache) in 47 s against 117 s
#: (benchmarks/results/compile_cache*.json); its step read 4-10% slower on a busy 2-core machine
DEFAULT_BLOCKS_PER_GRAPH = 2


def compile_cache_dir() -> str:
    """The folder of torch's compile caches, ``TORCHINDUCTOR_CACHE_DIR``. Where that is unset or
    torch's default under ``/tmp`` (``import torch._dynamo``, which creating an optimiser does,
    writes the default into the variable), sets it to ``~/.cache/monoflow/torch_compile``
    (``$XDG_CACHE_HOME/monoflow/torch_compile``), which survives a reboot, and returns that; any
    other folder is the user's and is kept. Inductor and AOTAutograd read the variable at every
    lookup, so this holds from the next compile on; a folder that cannot be created leaves torch's."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if folder and os.path.abspath(folder) != os.path.abspath(default_cache_dir()):
        return folder
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    mine = os.path.join(base, "monoflow", "torch_compile")
    try:
        os.makedirs(mine, exist_ok=True)
    except OSError:
        return folder or default_cache_dir()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = mine
    return mine


#: compiled variants one process may hold of a graph: every architecture, batch size and learnable-
#: concatenation state is one (torch's own limit, 8, is reached by a process that trains several models)
RECOMPILE_LIMIT = 64


def _run_compiled(function, what: str, *args):
    """``function(*args)``; a failed compilation becomes an error that says what to do."""
    try:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return function(*args)
    except torch._dynamo.exc.BackendCompilerFailed as error:
        inner = getattr(error, "inner_exception", error)
        raise RuntimeError(
            f"torch.compile could not compile {what} ({type(inner).__name__}: {str(inner).splitlines()[0] if str(inner) else ''}); "
            "on a CPU it needs a working C++ compiler (gcc or clang): install one, or train without --compile"
        ) from error


class _Compilations:
    """Counts and times the calls that (re)compile: those made with a new key (what the compiled
    graph depends on besides its inputs' shapes)."""

    def __init__(self) -> None:
        self.count, self.seconds = 0, 0.0
        self._key: Optional[Hashable] = None

    @contextmanager
    def timed(self, key: Hashable) -> Iterator[bool]:
        """Yields whether ``key`` is new; if so, the block's wall time is added to ``seconds``."""
        if key == self._key:
            yield False
            return
        tick = time.perf_counter()
        yield True
        self.seconds += time.perf_counter() - tick
        self.count += 1
        self._key = key


def newton_resolvent(g: nn.Module, b: Tensor, steps: int) -> Tuple[Tensor, Tensor, Tensor]:
    r"""``(w, g(w), dg/dw)`` at the solution of :math:`w + g(w) = b` after ``steps`` Newton steps
    and the differentiable one (see the module's docstring): ``w`` has the implicit gradients,
    and ``g(w)``, ``dg/dw`` (one differentiable pass at ``w``) give the residual
    :math:`\|w + g(w) - b\|` and the log-det. ``g.jacobian(w)`` must return ``(g(w), dg/dw)``."""
    with torch.no_grad():
        w = newton_start(g, b.detach(), 1.0, steps)
    value, jac = g.jacobian(w)
    eye = torch.eye(b.shape[1], dtype=b.dtype, device=b.device)
    w = w - solve_small(eye + jac.detach(), w + value - b)
    return (w,) + g.jacobian(w)


def _blocks_pass(blocks: Sequence[nn.Module], x: Tensor,
                 steps: int) -> Tuple[Tensor, Tensor, List[Tensor], List[Tensor]]:
    """``blocks`` applied in turn to ``x``: (output, summed log-det, residual per monotone block and
    sample at its solution, norm of the solution)."""
    logdet = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    residuals, norms = [], []
    for block in blocks:  # the blocks' own right-hand side, output and log-det series
        if isinstance(block, MonotoneBlock):
            b = block.solve_rhs(x)
            w, value, jac = newton_resolvent(block.g, b, steps)
            residuals.append((w + value - b).detach().norm(dim=1))
            norms.append(w.detach().norm(dim=1))
            x, block_logdet = block.output(x, w), block.series.exact(jac)
        else:
            value, jac = block.g.jacobian(x)
            x, block_logdet = block.output(x, value), block.series.exact(jac)
        logdet = logdet + block_logdet
    return x, logdet, residuals, norms


def _flow_loss(flow: nn.Module, x: Tensor, steps: int, chunks: Optional[Sequence[Sequence[nn.Module]]] = None,
               blocks_pass=_blocks_pass) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """(loss, residual per monotone block and sample at its solution, norm of the solution), with
    ``blocks_pass`` (the eager :func:`_blocks_pass` or its compiled form) applied to each of
    ``chunks`` of consecutive blocks (default: all blocks at once)."""
    logdet = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    residuals: List[Tensor] = []
    norms: List[Tensor] = []
    for chunk in chunks if chunks is not None else [list(flow.blocks)]:
        x, chunk_logdet, chunk_residuals, chunk_norms = blocks_pass(chunk, x, steps)
        logdet = logdet + chunk_logdet
        residuals += chunk_residuals
        norms += chunk_norms
    return -(flow.base.log_prob(x) + logdet).mean(), residuals, norms


def _check_supported(flow: nn.Module) -> None:
    blocks = getattr(flow, "blocks", None)
    if blocks is None or not hasattr(flow, "base"):
        raise ValueError(f"CompiledFlowLoss needs a monoflow Flow, got {type(flow).__name__}")
    for index, block in enumerate(blocks):
        kind = type(block).__name__
        if type(block) not in (MonotoneBlock, ResidualBlock):
            raise ValueError(f"CompiledFlowLoss supports MonotoneBlock and ResidualBlock; block {index} is a {kind}")
        if not ((isinstance(block.g, DenseNet) and block.g._flat) or isinstance(block.g, LipschitzChain)):
            raise ValueError(f"CompiledFlowLoss needs g built by dense_mlp or lipswish_mlp (they propagate "
                             f"Jacobians); block {index} ({kind}) has a {type(block.g).__name__}")
        if not isinstance(block.logdet_estimator, ExactLogDet):
            raise ValueError(f"CompiledFlowLoss needs logdet='exact'; block {index} ({kind}) uses "
                             f"{block.logdet_estimator!r}")


#: activations whose DenseNets call the fused kernels inside the compiled graphs: CPila's (the
#: compiled Monotone Flow step ran 20-22 ms against 27-29 ms with Inductor's own kernels); not
#: CLipSwish's, whose kernel backward (four sigmoids per element) lost to Inductor's code (21 ms
#: against 19 ms for the compiled i-DenseNet step, same machine, one after the other)
KERNEL_OPERATOR_ACTIVATIONS = (CPila,)


def _use_kernel_operators(flow: nn.Module) -> bool:
    """Let every flat DenseNet g of ``flow`` whose layers use :data:`KERNEL_OPERATOR_ACTIVATIONS` call
    the fused CPU kernels as torch operators inside the compiled graphs
    (:mod:`monoflow.lipschitz.dense_fused`), where they apply: CPU float32/float64 parameters,
    kernels available. Whether any does."""
    parameter = next(flow.parameters(), None)
    usable = (parameter is not None and parameter.device.type == "cpu"
              and parameter.dtype in (torch.float32, torch.float64) and kernels.available())
    chosen = []
    for block in flow.blocks:
        net = block.g
        if isinstance(net, DenseNet):
            net.use_kernel_operators = bool(usable and dense_fused.supported(net) and all(
                type(layer.activation) in KERNEL_OPERATOR_ACTIVATIONS for layer in net.layers[:-1]))
            chosen.append(net.use_kernel_operators)
    return any(chosen)


class CompiledFlowLoss:
    r"""``loss = CompiledFlowLoss(flow)(x)``: :math:`-\frac1B\sum_i \log p(x_i)` of a flat flow
    as compiled graphs (see the module's docstring), with the value and gradients of
    ``-flow.log_prob(x).mean()`` up to the solves' residuals.

    The first call compiles (minutes for the paper's 10-block toy models on a CPU; the compile
    cache on disk, :func:`compile_cache_dir`, shortens later compiles of the same architecture,
    in any process); switching learnable concatenation on compiles once more. Each monotone
    block's ``last_solves["forward"]`` records the Newton solve. A solve converged where
    :math:`\|w + g(w) - b\| \le \text{atol}\sqrt d + \text{rtol}\,\|w\|` (the solver's test) with
    both norms finite;
    ``batches`` and ``fallbacks`` count the calls and those recomputed by the eager flow because a
    solve missed it.
    ``compiles`` and ``compile_s`` count the compilations and their time: a call that finds a new
    set of trainable parameters or a switched learnable concatenation (the first call, and the one
    after learnable concatenation switches on) first runs the graph and its backward once, so
    that both compile there.

    Args:
        flow: a :class:`~monoflow.flows.Flow` of MonotoneBlock / ResidualBlock with DenseNet or
            LipschitzChain g and ``logdet="exact"``.
        newton_steps: Newton steps per solve before the differentiable one (default
            :data:`DEFAULT_NEWTON_STEPS`, 3).
        atol, rtol: the convergence test's tolerances (default: the solver's for the dtype).
        blocks_per_graph: how many consecutive blocks one compiled graph holds (default
            :data:`DEFAULT_BLOCKS_PER_GRAPH`, 2; ``None``: the whole flow). The graph is compiled
            once and reused for every such group of blocks of the same kinds, so Dynamo traces
            ``blocks_per_graph`` blocks instead of all of them; one graph for the whole flow
            compiles longer and saves a few graph calls per step (the speed chapter compares them).
    """

    def __init__(self, flow: nn.Module, newton_steps: int = DEFAULT_NEWTON_STEPS, atol: Optional[float] = None,
                 rtol: Optional[float] = None, blocks_per_graph: Optional[int] = DEFAULT_BLOCKS_PER_GRAPH):
        _check_supported(flow)
        if not isinstance(newton_steps, int) or isinstance(newton_steps, bool) or newton_steps < 0:
            raise ValueError(f"newton_steps must be a non-negative int, got {newton_steps!r}")
        if blocks_per_graph is not None and (not isinstance(blocks_per_graph, int) or isinstance(blocks_per_graph, bool)
                                             or blocks_per_graph < 1):
            raise ValueError(f"blocks_per_graph must be a positive int or None, got {blocks_per_graph!r}")
        self.flow = flow
        self.newton_steps = newton_steps
        self.atol, self.rtol = atol, rtol
        self.batches = 0
        self.fallbacks = 0
        self._compilations = _Compilations()
        # what the graph depends on besides the batch's shape (see __call__), listed once
        self._parameters = list(flow.parameters())
        self._dense_layers = [m for m in flow.modules() if isinstance(m, LipschitzDenseLayer)]
        self._monotone = [block for block in flow.blocks if isinstance(block, MonotoneBlock)]
        blocks = list(flow.blocks)
        size = blocks_per_graph or len(blocks)
        self.blocks_per_graph = blocks_per_graph
        self._chunks = [tuple(blocks[i:i + size]) for i in range(0, len(blocks), size)]
        self.kernel_operators = _use_kernel_operators(flow)
        compile_cache_dir()
        # one graph per group of blocks, reused by every group with the same kinds of blocks: torch
        # traces modules passed as arguments by structure, their parameters are the graph's inputs
        self._compiled_pass = torch.compile(_blocks_pass, fullgraph=True, dynamic=False)

    def _loss(self, x: Tensor) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
        if torch.is_grad_enabled() and not x.requires_grad and len(self._chunks) > 1:
            # the later groups' inputs require grad; so does the first's: one graph for all
            x = x.detach().requires_grad_()
        return _flow_loss(self.flow, x, self.newton_steps, self._chunks, self._compiled_pass)

    def __call__(self, x: Tensor) -> Tensor:
        dim = self.flow.event_shape[0] if getattr(self.flow, "event_shape", None) else None
        if not torch.is_tensor(x) or x.dim() != 2 or (dim is not None and x.shape[1] != dim):
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"CompiledFlowLoss expects a batch of shape (batch, {dim or 'd'}), got {shape}")
        # what the compiled graph depends on besides the batch's shape: which parameters train,
        # and whether the concatenation scales are used (learnable concatenation)
        trainable = (tuple(p.requires_grad for p in self._parameters),
                     tuple(m.learnable_concat for m in self._dense_layers))
        with self._compilations.timed(trainable) as new:
            if new:  # torch.compile traces and compiles (again) here
                warm_up, _, _ = _run_compiled(self._loss, "the training loss", x)
                if warm_up.requires_grad:  # the backward graph compiles at its first call
                    torch.autograd.grad(warm_up, [p for p in self.flow.parameters() if p.requires_grad],
                                        allow_unused=True)
        loss, residuals, norms = _run_compiled(self._loss, "the training loss", x)
        self.batches += 1
        converged = self._record(residuals, norms, x)
        if not converged:
            self.fallbacks += 1
            return -self.flow.log_prob(x).mean()
        return loss

    @property
    def compiles(self) -> int:
        return self._compilations.count

    @property
    def compile_s(self) -> float:
        return self._compilations.seconds

    def _record(self, residuals: List[Tensor], norms: List[Tensor], x: Tensor) -> bool:
        """Write each monotone block's solve into ``last_solves``; whether all converged."""
        atol, rtol = default_tolerances(x.dtype)
        atol = atol if self.atol is None else self.atol
        rtol = rtol if self.rtol is None else self.rtol
        if not self._monotone:
            return True
        # an overflowing solve has residual and tolerance both inf, and inf <= inf holds: only a
        # finite residual at a finite solution can be converged (SolverInfo masks the residual too)
        residual, norm = torch.stack(residuals), torch.stack(norms)
        converged = (residual <= atol * math.sqrt(x.shape[1]) + rtol * norm) & torch.isfinite(norm)
        iterations = torch.full_like(residuals[0], self.newton_steps + 1, dtype=torch.long)
        for block, block_residual, block_converged in zip(self._monotone, residuals, converged):
            block.last_solves.pop("adjoint", None)  # the gradient is a direct solve inside the graph
            block.last_solves["forward"] = SolverInfo(iterations=iterations, residual=block_residual,
                                                      converged=block_converged, evaluations=self.newton_steps + 1)
        return bool(converged.all())  # one synchronisation for all blocks


class CompiledUpdate:
    """``update()``: ``optimizer.step()`` then ``power_iterations`` power iterations of every
    spectral norm of ``model`` (:func:`~monoflow.lipschitz.update_lipschitz`), compiled with
    ``torch.compile``. The same updates as the eager calls up to rounding; the first call compiles
    (once more if a learning rate changes, which ``torch.compile`` treats as a constant, or when
    other parameters have gradients). ``compile_s`` sums the wall time of those calls (each with
    its one update)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, power_iterations: int):
        if not isinstance(power_iterations, int) or isinstance(power_iterations, bool) or power_iterations < 0:
            raise ValueError(f"power_iterations must be a non-negative int, got {power_iterations!r}")
        self.model, self.optimizer, self.power_iterations = model, optimizer, power_iterations
        self._compilations = _Compilations()
        self._parameters = list(model.parameters())
        compile_cache_dir()
        self._update = torch.compile(self._eager)

    def _eager(self) -> None:
        self.optimizer.step()
        update_lipschitz(self.model, n_iterations=self.power_iterations)

    def __call__(self) -> None:
        key = (tuple(group["lr"] for group in self.optimizer.param_groups),
               tuple(p.grad is not None for p in self._parameters))
        with self._compilations.timed(key):
            _run_compiled(self._update, "the parameter update")

    @property
    def compile_s(self) -> float:
        return self._compilations.seconds
