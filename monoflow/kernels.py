r"""Fused CPU kernels: CPila, LipSwish and CLipSwish with their derivatives in one pass each,
compiled at first use.

In plain PyTorch, :class:`~monoflow.activations.CPila` with its derivative is about twenty
elementwise operators (concatenate, shift, clamp, exponential, two cubic polynomials, selects,
scale), (C)LipSwish about a dozen. On a CPU each operator is a dispatch and a pass over memory: on
the 2-D toy models' (500, 8) pre-activations the twenty dispatches cost about 110 us where the
arithmetic needs a few, and on image tensors the twenty passes over memory cost ten times one. For
CPila the kernels here compute, with :math:`u_1 = x - s`, :math:`u_2 = -x - s` and :math:`c` =
``scale``,

.. math::

    \text{value} = [P(u_1),\ P(u_2)]/c, \quad \text{slope} = [P'(u_1),\ -P'(u_2)]/c, \quad
    \bar x = \big(\bar v_1 P'(u_1) - \bar v_2 P'(u_2) + \bar s_1 P''(u_1) + \bar s_2 P''(u_2)\big)/c

(:math:`P` = Pila, :math:`\bar v, \bar s` the gradients of value and slope, :math:`\bar x` that of
x), with :math:`e^t` for :math:`t = k\,\min(u, 0) \ge -60` from a range reduction and a polynomial
(float32: degree 7, float64: degree 13; about one rounding error of the result) in one vectorised
loop. For (C)LipSwish, :math:`f(u) = u\,\sigma(\beta u)/1.1` and the halves :math:`[f(x), f(-x)]`,
the same with :math:`\sigma` from :math:`e^{-|\beta u|}`, and the backward also gives the gradient
of the scalar :math:`\beta`. NaN inputs give NaN outputs, as the plain operators do.

The C source below has no dependency (no torch headers): the first use compiles it with the
machine's C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``; ``-O3 -march=native``, and
``-O3`` alone where the compiler refuses that) into
``~/.cache/monoflow/kernels/<key>/`` (``$XDG_CACHE_HOME`` where set), where the key hashes the
source, compiler, flags and the CPU's feature flags, and loads it with :mod:`ctypes`; later
processes load the library (milliseconds). Where there is no compiler, the build fails, or
``MONOFLOW_FUSED_KERNELS=0`` is set, :func:`status` says why and the activations run their plain
PyTorch operators, which give the same values up to rounding. The plain operators also run for
tensors not on the CPU, not float32/float64, inside ``torch.compile`` (Inductor fuses them
itself), under ``torch.func`` transforms and, for (C)LipSwish, with one :math:`\beta` per row.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["status", "available", "applicable", "enabled", "cpila_forward", "cpila_backward", "lipswish_forward",
           "lipswish_backward", "SOURCE"]

#: the environment variable that switches the fused kernels off (``0``, ``off``, ``false``, ``no``)
DISABLE_VARIABLE = "MONOFLOW_FUSED_KERNELS"

SOURCE = r"""
#include <stdint.h>
#include <string.h>

/* e^t for t in [-60, 0] (NaN stays NaN): t = n ln2 + r, |r| <= ln2 / 2, e^r by Horner, 2^n by
   its bits. Rounding to the nearest integer by adding and subtracting 1.5 * 2^(mantissa bits). */
static inline float exp_f32(float t) {
    float n = (t * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = (t - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)(n == n ? n : 0.0f) + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

static inline double exp_f64(double t) {
    double n = (t * 1.4426950408889634074 + 6755399441055744.0) - 6755399441055744.0;
    double r = (t - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
    double p = 1.0 / 6227020800.0;
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    int64_t bits = ((int64_t)(n == n ? n : 0.0) + 1023) << 52;
    double two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

/* Pila and its first two derivatives at u (t = k min(u, 0), clamped at -60; NaN passes). Each
   loop below runs over one half of one row with one simple body: the vectoriser then also takes
   rows as short as the 2-D models' 8 channels. */
#define PILA_KERNELS(T, SUFFIX, EXP)                                                              \
static inline T t_of_##SUFFIX(T u, T k) {                                                         \
    T t = k * u;                                                                                  \
    t = t < (T)-60 ? (T)-60 : t;                                                                  \
    return t > (T)0 ? (T)0 : t;                                                                   \
}                                                                                                 \
static inline T value_##SUFFIX(T u, T k) {                                                        \
    T t = t_of_##SUFFIX(u, k);                                                                    \
    T negative = (((T)0.5 * t - (T)1) * t + (T)1) * t / k * EXP(t);                               \
    return u > (T)0 ? u : negative;                                                               \
}                                                                                                 \
static inline T slope_##SUFFIX(T u, T k) {                                                        \
    T t = t_of_##SUFFIX(u, k);                                                                    \
    T negative = ((((T)0.5 * t + (T)0.5) * t - (T)1) * t + (T)1) * EXP(t);                        \
    return u > (T)0 ? (T)1 : negative;                                                            \
}                                                                                                 \
static inline T curvature_##SUFFIX(T u, T k) {                                                    \
    T t = t_of_##SUFFIX(u, k);                                                                    \
    T negative = k * ((T)0.5 * t + (T)2) * t * t * EXP(t);                                        \
    return u > (T)0 ? (T)0 : negative;                                                            \
}                                                                                                 \
                                                                                                  \
void cpila_forward_##SUFFIX(const T* restrict x, T* restrict value, T* restrict slope,            \
                            int64_t rows, int64_t cols, T k, T shift, T inv_scale) {              \
    for (int64_t b = 0; b < rows; ++b) {                                                          \
        const T* xb = x + b * cols;                                                               \
        T* v1 = value + 2 * b * cols;                                                             \
        T* v2 = v1 + cols;                                                                        \
        for (int64_t j = 0; j < cols; ++j) v1[j] = value_##SUFFIX(xb[j] - shift, k) * inv_scale;  \
        for (int64_t j = 0; j < cols; ++j) v2[j] = value_##SUFFIX(-xb[j] - shift, k) * inv_scale; \
        if (slope) {                                                                              \
            T* s1 = slope + 2 * b * cols;                                                         \
            T* s2 = s1 + cols;                                                                    \
            for (int64_t j = 0; j < cols; ++j) s1[j] = slope_##SUFFIX(xb[j] - shift, k) * inv_scale; \
            for (int64_t j = 0; j < cols; ++j) s2[j] = -slope_##SUFFIX(-xb[j] - shift, k) * inv_scale; \
        }                                                                                         \
    }                                                                                             \
}                                                                                                 \
                                                                                                  \
void cpila_backward_##SUFFIX(const T* restrict x, const T* restrict grad_value,                   \
                             const T* restrict grad_slope, T* restrict grad_x, int64_t rows,      \
                             int64_t cols, T k, T shift, T inv_scale) {                           \
    for (int64_t b = 0; b < rows; ++b) {                                                          \
        const T* xb = x + b * cols;                                                               \
        const T* gv1 = grad_value + 2 * b * cols;                                                 \
        const T* gv2 = gv1 + cols;                                                                \
        T* gx = grad_x + b * cols;                                                                \
        for (int64_t j = 0; j < cols; ++j) gx[j] = gv1[j] * slope_##SUFFIX(xb[j] - shift, k);     \
        for (int64_t j = 0; j < cols; ++j) gx[j] -= gv2[j] * slope_##SUFFIX(-xb[j] - shift, k);   \
        if (grad_slope) {                                                                         \
            const T* gs1 = grad_slope + 2 * b * cols;                                             \
            const T* gs2 = gs1 + cols;                                                            \
            for (int64_t j = 0; j < cols; ++j) gx[j] += gs1[j] * curvature_##SUFFIX(xb[j] - shift, k); \
            for (int64_t j = 0; j < cols; ++j) gx[j] += gs2[j] * curvature_##SUFFIX(-xb[j] - shift, k); \
        }                                                                                         \
        for (int64_t j = 0; j < cols; ++j) gx[j] *= inv_scale;                                    \
    }                                                                                             \
}

/* LipSwish f(u) = u sig(z) / 1.1 with z = beta u, and the derivatives the backward needs
   (sig' = sig (1 - sig)): f' = (sig + z sig') / 1.1, f'' = beta sig' (2 + z (1 - 2 sig)) / 1.1,
   df/dbeta = u^2 sig' / 1.1, df'/dbeta = u sig' (2 + z (1 - 2 sig)) / 1.1. sig from e^-|z|. With
   halves = 2 (CLipSwish) the output is [f(x), f(-x)] and the slope [f'(x), -f'(-x)]. */
#define LIPSWISH_KERNELS(T, SUFFIX, EXP)                                                          \
static inline T sigmoid_##SUFFIX(T z) {                                                           \
    T a = z < (T)0 ? z : -z;                                                                      \
    T e = EXP(a < (T)-60 ? (T)-60 : a);                                                           \
    T small = e / ((T)1 + e);                                                                     \
    return z < (T)0 ? small : (T)1 - small;                                                       \
}                                                                                                 \
static inline T lipswish_value_##SUFFIX(T u, T beta) {                                            \
    return u * sigmoid_##SUFFIX(beta * u) / (T)1.1;                                               \
}                                                                                                 \
static inline T lipswish_slope_##SUFFIX(T u, T beta) {                                            \
    T z = beta * u, s = sigmoid_##SUFFIX(z);                                                      \
    return (s + z * s * ((T)1 - s)) / (T)1.1;                                                     \
}                                                                                                 \
                                                                                                  \
void lipswish_forward_##SUFFIX(const T* restrict x, T* restrict value, T* restrict slope,         \
                               int64_t rows, int64_t cols, int64_t halves, T beta, T inv_scale) { \
    if (halves == 1) { cols *= rows; rows = 1; } /* one flat loop: short rows do not vectorise */ \
    for (int64_t b = 0; b < rows; ++b) {                                                          \
        const T* xb = x + b * cols;                                                               \
        for (int64_t h = 0; h < halves; ++h) {                                                    \
            const T sign = h ? (T)-1 : (T)1;                                                      \
            T* v = value + (halves * b + h) * cols;                                               \
            for (int64_t j = 0; j < cols; ++j)                                                    \
                v[j] = lipswish_value_##SUFFIX(sign * xb[j], beta) * inv_scale;                   \
            if (slope) {                                                                          \
                T* s = slope + (halves * b + h) * cols;                                           \
                for (int64_t j = 0; j < cols; ++j)                                                \
                    s[j] = sign * lipswish_slope_##SUFFIX(sign * xb[j], beta) * inv_scale;        \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
}                                                                                                 \
                                                                                                  \
void lipswish_backward_##SUFFIX(const T* restrict x, const T* restrict grad_value,                \
                                const T* restrict grad_slope, T* restrict grad_x,                 \
                                T* restrict grad_beta, int64_t rows, int64_t cols,                \
                                int64_t halves, T beta, T inv_scale) {                            \
    const T c = inv_scale / (T)1.1;                                                               \
    if (halves == 1) { cols *= rows; rows = 1; }                                                  \
    for (int64_t b = 0; b < rows; ++b) {                                                          \
        const T* xb = x + b * cols;                                                               \
        T* gx = grad_x + b * cols;                                                                \
        T* gb = grad_beta + b * cols;                                                             \
        for (int64_t j = 0; j < cols; ++j) { gx[j] = (T)0; gb[j] = (T)0; }                        \
        for (int64_t h = 0; h < halves; ++h) {                                                    \
            const T sign = h ? (T)-1 : (T)1;                                                      \
            const T* gv = grad_value + (halves * b + h) * cols;                                   \
            for (int64_t j = 0; j < cols; ++j) {                                                  \
                T u = sign * xb[j], z = beta * u, s = sigmoid_##SUFFIX(z), ds = s * ((T)1 - s);   \
                gx[j] += sign * gv[j] * (s + z * ds) * c;                                         \
                gb[j] += gv[j] * u * u * ds * c;                                                  \
            }                                                                                     \
            if (grad_slope) {                                                                     \
                const T* gs = grad_slope + (halves * b + h) * cols;                               \
                for (int64_t j = 0; j < cols; ++j) {                                              \
                    T u = sign * xb[j], z = beta * u, s = sigmoid_##SUFFIX(z), ds = s * ((T)1 - s); \
                    T bend = (T)2 + z * ((T)1 - (T)2 * s);                                        \
                    gx[j] += gs[j] * beta * ds * bend * c;                                        \
                    gb[j] += sign * gs[j] * u * ds * bend * c;                                    \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
}

PILA_KERNELS(float, f32, exp_f32)
PILA_KERNELS(double, f64, exp_f64)
LIPSWISH_KERNELS(float, f32, exp_f32)
LIPSWISH_KERNELS(double, f64, exp_f64)
"""

_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")
_PORTABLE_FLAGS = ("-O3", "-shared", "-fPIC")
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_CTYPE = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}
#: each C function's arguments: (pointers, int64 sizes, scalars of the tensors' type)
_SIGNATURES = {"cpila_forward": (3, 2, 3), "cpila_backward": (4, 2, 3),
               "lipswish_forward": (3, 3, 2), "lipswish_backward": (5, 3, 2)}

_lock = threading.Lock()
_state: Dict[str, Any] = {"library": None, "status": None}
_switch = {"enabled": True}
_functions: Dict[Tuple[str, torch.dtype], Any] = {}  # (name, dtype) -> the loaded C function


def _cache_folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "monoflow" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> Optional[str]:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _build(compiler: str, folder: Path) -> Tuple[Optional[Path], str]:
    """Compile :data:`SOURCE` into ``folder``; (library, "") or (None, why not)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "libmonoflow_kernels.so"
    errors = []
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        source = Path(scratch) / "kernels.c"
        source.write_text(SOURCE)
        built = Path(scratch) / target.name
        for flags in (_FLAGS, _PORTABLE_FLAGS):
            try:
                completed = subprocess.run([compiler, *flags, "-o", str(built), str(source)],
                                           capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as error:
                errors.append(f"{' '.join(flags)}: {error}")
                continue
            if completed.returncode == 0:
                os.replace(built, target)  # atomic: a process building beside this one loads either
                return target, ""
            errors.append(f"{' '.join(flags)}: {completed.stderr.strip().splitlines()[-1:] or completed.returncode}")
    return None, f"{compiler} failed ({'; '.join(map(str, errors))})"


def _load() -> Tuple[Optional[ctypes.CDLL], Dict[str, Any]]:
    if os.environ.get(DISABLE_VARIABLE, "").strip().lower() in ("0", "off", "false", "no"):
        return None, {"available": False, "reason": f"switched off by {DISABLE_VARIABLE}", "library": None}
    if platform.system() == "Windows":
        return None, {"available": False, "reason": "not built on Windows", "library": None}
    compiler = _compiler()
    if compiler is None:
        return None, {"available": False, "reason": "no C compiler ($CC, cc, gcc or clang) on PATH", "library": None}
    key = hashlib.sha256("\n".join([SOURCE, compiler, _compiler_version(compiler), " ".join(_FLAGS),
                                    platform.machine(), _cpu_flags()]).encode()).hexdigest()[:20]
    folder = _cache_folder() / key
    path = folder / "libmonoflow_kernels.so"
    try:
        if not path.exists():
            built, why = _build(compiler, folder)
            if built is None:
                return None, {"available": False, "reason": why, "library": None}
        library = ctypes.CDLL(str(path))
    except OSError as error:
        return None, {"available": False, "reason": f"could not build or load {path}: {error}", "library": None}
    for dtype, suffix in _SUFFIX.items():
        for name, (pointers, integers, scalars) in _SIGNATURES.items():
            function = getattr(library, f"{name}_{suffix}")
            function.restype = None
            function.argtypes = [ctypes.c_void_p] * pointers + [ctypes.c_int64] * integers + [_CTYPE[dtype]] * scalars
            _functions[(name, dtype)] = function
    return library, {"available": True, "reason": "", "library": str(path)}


def _library() -> Optional[ctypes.CDLL]:
    if _state["status"] is None:
        with _lock:
            if _state["status"] is None:
                _state["library"], _state["status"] = _load()
    return _state["library"]


def status() -> Dict[str, Any]:
    """``{"available": bool, "reason": why not (or ""), "library": its path}``; builds the library
    at the first call of the process (a few seconds), loads it from the cache afterwards."""
    _library()
    return dict(_state["status"])


def available() -> bool:
    """Whether the fused kernels are built and loaded (see :func:`status`)."""
    return _library() is not None


@contextmanager
def enabled(on: bool) -> Iterator[None]:
    """Within the block, use the fused kernels (``on=True``, where available) or the plain
    operators (``on=False``): benchmarks and tests compare both in one process."""
    before = _switch["enabled"]
    _switch["enabled"] = bool(on)
    try:
        yield
    finally:
        _switch["enabled"] = before


def _transforms_active() -> bool:
    return getattr(torch._C, "_are_functorch_transforms_active", lambda: False)()


def applicable(x: Tensor) -> bool:
    """Whether the fused kernels compute for ``x``: a plain CPU tensor of float32 or float64 with
    at least 2 dimensions, outside ``torch.compile`` and ``torch.func`` transforms, with the
    kernels switched on and available."""
    return (_switch["enabled"] and type(x) in (torch.Tensor, torch.nn.Parameter) and x.device.type == "cpu"
            and x.dtype in _SUFFIX and x.dim() >= 2 and not torch.compiler.is_compiling()
            and not _transforms_active() and _library() is not None)


#: inputs of at least this many elements are split into row blocks over torch's intra-op threads
PARALLEL_ELEMENTS = 1 << 18

_pool: Dict[str, Any] = {"executor": None, "workers": 0}


def _executor(workers: int) -> ThreadPoolExecutor:
    if _pool["workers"] != workers:
        if _pool["executor"] is not None:
            _pool["executor"].shutdown(wait=False)
        _pool["executor"], _pool["workers"] = ThreadPoolExecutor(max_workers=workers), workers
    return _pool["executor"]


def _run(name: str, rows: int, tensors: Sequence[Optional[Tensor]], integers: Sequence[int],
         scalars: Sequence[float]) -> None:
    """Call the C function ``name`` (for the first tensor's dtype) on contiguous ``tensors`` whose
    first dimension is ``rows`` (``None``: a null pointer), then ``rows``, ``integers`` and
    ``scalars``. Large inputs are split into blocks of rows, one per intra-op thread of torch
    (``torch.get_num_threads``): :mod:`ctypes` releases the GIL, so the blocks run in parallel."""
    function = _functions[(name, tensors[0].dtype)]
    workers = min(torch.get_num_threads(), rows)
    if workers < 2 or tensors[0].numel() < PARALLEL_ELEMENTS:
        function(*[None if t is None else t.data_ptr() for t in tensors], rows, *integers, *scalars)
        return
    row_bytes = [None if t is None else (t.numel() // rows) * t.element_size() for t in tensors]

    def call(start: int, stop: int) -> None:
        pointers = [None if t is None else t.data_ptr() + start * size for t, size in zip(tensors, row_bytes)]
        function(*pointers, stop - start, *integers, *scalars)

    bounds = [rows * i // workers for i in range(workers + 1)]
    list(_executor(workers).map(call, bounds[:-1], bounds[1:]))


def _prepared(x: Tensor, widened: torch.Size, grad_value: Optional[Tensor],
              grad_slope: Optional[Tensor]) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``x`` and the incoming gradients, detached, contiguous and of x's dtype (a zero gradient of
    the value where it is ``None``)."""
    x = x.detach().contiguous()
    grad_value = torch.zeros(widened, dtype=x.dtype) if grad_value is None else grad_value
    grad_value = grad_value.detach().contiguous().to(x.dtype)
    grad_slope = None if grad_slope is None else grad_slope.detach().contiguous().to(x.dtype)
    return x, grad_value, grad_slope


def _widened(x: Tensor, halves: int) -> torch.Size:
    """The output's shape: dim 1 times ``halves``."""
    return torch.Size((x.shape[0], halves * x.shape[1]) + tuple(x.shape[2:]))


def _columns(x: Tensor) -> int:
    return x.numel() // x.shape[0] if x.shape[0] else 0


def cpila_forward(x: Tensor, k: float, shift: float, scale: float,
                  with_slope: bool) -> Tuple[Tensor, Optional[Tensor]]:
    r"""``(value, slope)`` of CPila at ``x`` (B, C, ...) as in the module's docstring, each
    (B, 2C, ...); ``slope`` is ``None`` unless ``with_slope``. No autograd; call only where
    :func:`applicable` holds."""
    x = x.detach().contiguous()
    value = torch.empty(_widened(x, 2), dtype=x.dtype)
    slope = torch.empty_like(value) if with_slope else None
    _run("cpila_forward", x.shape[0], [x, value, slope], [_columns(x)], [k, shift, 1.0 / scale])
    return value, slope


def cpila_backward(x: Tensor, grad_value: Optional[Tensor], grad_slope: Optional[Tensor], k: float, shift: float,
                   scale: float) -> Tensor:
    r"""The gradient with respect to ``x`` of :math:`\langle \bar v, \text{value}\rangle + \langle \bar s,
    \text{slope}\rangle` (module docstring), ``grad_value`` / ``grad_slope`` of the output's shape
    (either may be ``None``: zero). No autograd; call only where :func:`applicable` holds."""
    x, grad_value, grad_slope = _prepared(x, _widened(x, 2), grad_value, grad_slope)
    grad_x = torch.empty_like(x)
    _run("cpila_backward", x.shape[0], [x, grad_value, grad_slope, grad_x], [_columns(x)], [k, shift, 1.0 / scale])
    return grad_x


def lipswish_forward(x: Tensor, beta: float, halves: int, scale: float,
                     with_slope: bool) -> Tuple[Tensor, Optional[Tensor]]:
    r"""``(value, slope)`` of LipSwish (``halves=1``) or CLipSwish (``halves=2``) at ``x``
    (B, C, ...) for a scalar :math:`\beta`, divided by ``scale``; no autograd; call only where
    :func:`applicable` holds."""
    x = x.detach().contiguous()
    value = torch.empty(_widened(x, halves), dtype=x.dtype)
    slope = torch.empty_like(value) if with_slope else None
    _run("lipswish_forward", x.shape[0], [x, value, slope], [_columns(x), halves], [beta, 1.0 / scale])
    return value, slope


def lipswish_backward(x: Tensor, grad_value: Optional[Tensor], grad_slope: Optional[Tensor], beta: float,
                      halves: int, scale: float) -> Tuple[Tensor, Tensor]:
    r"""The gradients with respect to ``x`` and to :math:`\beta` (a 0-dim tensor) of
    :math:`\langle \bar v, \text{value}\rangle + \langle \bar s, \text{slope}\rangle` for
    :func:`lipswish_forward`'s outputs; either incoming gradient may be ``None`` (zero)."""
    x, grad_value, grad_slope = _prepared(x, _widened(x, halves), grad_value, grad_slope)
    grad_x, grad_beta = torch.empty_like(x), torch.empty_like(x)  # the beta gradient of each element, then summed
    _run("lipswish_backward", x.shape[0], [x, grad_value, grad_slope, grad_x, grad_beta], [_columns(x), halves],
         [beta, 1.0 / scale])
    return grad_x, grad_beta.sum()
