"""Fixed-point solver: convergence, per-sample stopping, diagnostics, failure policy."""
import warnings

import pytest
import torch

from monoflow.solvers import SolverError, SolverOptions, SolverWarning, fixed_point_solve


def _contraction(batch=16, dim=5, lip=0.9):
    A = torch.randn(dim, dim)
    A = lip * A / torch.linalg.matrix_norm(A, 2)
    b = torch.randn(batch, dim)

    def f(z, index):
        rhs = b if index is None else b[index]
        return rhs - torch.tanh(z @ A.T)

    return f, b


@pytest.mark.parametrize("method", ["anderson", "picard"])
def test_converges_to_fixed_point(method, float64):
    f, b = _contraction()
    z, info = fixed_point_solve(f, b, SolverOptions(method=method))
    assert info.all_converged
    assert (f(z, None) - z).norm(dim=1).max() < 1e-9
    assert info.iterations.shape == (16,) and info.residual.shape == (16,)


def test_anderson_needs_fewer_evaluations_than_picard():
    f, b = _contraction(lip=0.95)
    _, anderson = fixed_point_solve(f, b, SolverOptions(method="anderson"))
    _, picard = fixed_point_solve(f, b, SolverOptions(method="picard"))
    assert anderson.evaluations < picard.evaluations


def test_per_sample_stopping_freezes_converged_samples():
    # sample 0 is already at its fixed point (f(z) = 0 for z0 = 0); the others need iterations
    scales = torch.tensor([0.0, 0.9, 0.9])
    target = torch.tensor([[0.0], [1.0], [2.0]])

    seen = []

    def f(z, index):
        idx = torch.arange(3) if index is None else index
        seen.append(idx.clone())
        return scales[idx, None] * torch.sin(z) + (1 - scales[idx, None]) * target[idx]

    z, info = fixed_point_solve(f, torch.zeros(3, 1), SolverOptions(method="picard"))
    assert info.iterations[0] == 1 and info.iterations[1] > 1
    assert all(0 not in idx.tolist() for idx in seen[1:])
    assert info.all_converged


def test_failure_policies():
    def f(z, index):  # expansive: no fixed point reachable by iteration
        return 2.0 * z + 1.0

    z0 = torch.ones(4, 3)
    with pytest.raises(SolverError, match="did not converge"):
        fixed_point_solve(f, z0, SolverOptions(method="picard", max_iterations=5, on_failure="raise"))
    with pytest.warns(SolverWarning, match="did not converge"):
        _, info = fixed_point_solve(f, z0, SolverOptions(method="picard", max_iterations=5))
    assert not info.converged.any()
    z, info = fixed_point_solve(f, z0, SolverOptions(method="picard", max_iterations=5, on_failure="nan"))
    assert torch.isnan(z).all()
    assert info.iterations.eq(5).all()


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="on_failure"):
        SolverOptions(on_failure="ignore")
    with pytest.raises(ValueError, match="method"):
        SolverOptions(method="newton")
    with pytest.raises(ValueError, match="max_iterations"):
        SolverOptions(max_iterations=0)


def test_float32_default_tolerance_is_reachable():
    f, b = _contraction(batch=64, dim=50, lip=0.97)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = fixed_point_solve(f, b.float(), SolverOptions())
    assert info.all_converged and info.iterations.max() < 40


@pytest.mark.parametrize("d", [1, 2, 3])
def test_solve_small_matches_a_dense_solve(d):
    """The closed forms (d <= 2) and the dense fallback solve batches of small systems; the direct
    adjoint and the compiled Newton steps use them."""
    from monoflow.implicit import solve_small

    torch.manual_seed(d)
    matrix = torch.eye(d, dtype=torch.float64) + 0.4 * torch.randn(64, d, d, dtype=torch.float64)
    rhs = torch.randn(64, d, dtype=torch.float64)
    solution = solve_small(matrix, rhs)
    torch.testing.assert_close(solution, torch.linalg.solve(matrix, rhs.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close((matrix @ solution.unsqueeze(-1)).squeeze(-1), rhs)
