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

The same library holds the whole flat Lipschitz DenseNet of the 2-D models
(:mod:`monoflow.lipschitz.dense_fused`): :func:`dense_forward` (value and Jacobian),
:func:`dense_backward` (their gradients in the input, the packed weights and biases and each
CLipSwish :math:`\beta`) and :func:`dense_newton` (Newton steps of a resolvent solve), one block of
64 samples at a time with the features stored feature by feature, so that every loop runs over
the samples.

The C source below has no dependency (no torch headers): the first use compiles it with the
machine's C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``; ``-O3 -march=native
-fno-trapping-math``, and without ``-march=native`` where the compiler refuses that) into
``~/.cache/monoflow/kernels/<key>/`` (``$XDG_CACHE_HOME`` where set), where the key hashes the
source, compiler, flags and the CPU's feature flags, and loads it with :mod:`ctypes`; later
processes load the library (milliseconds). Where there is no compiler, the build fails, or
``MONOFLOW_FUSED_KERNELS=0`` is set, :func:`status` says why and the activations run their plain
PyTorch operators, which give the same values up to rounding. The plain operators also run for
tensors not on the CPU, not float32/float64, inside ``torch.compile`` (Inductor fuses them
itself), under ``torch.func`` transforms and Python dispatch modes (FLOP counting) and, for
(C)LipSwish, with one :math:`\beta` per row.
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
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["status", "available", "applicable", "enabled", "cpila_forward", "cpila_backward", "lipswish_forward",
           "lipswish_backward", "dense_forward", "dense_backward", "dense_newton", "SOURCE"]

#: the environment variable that switches the fused kernels off (``0``, ``off``, ``false``, ``no``)
DISABLE_VARIABLE = "MONOFLOW_FUSED_KERNELS"

SOURCE = r"""
#include <stdint.h>
#include <string.h>

/* e^t for t in [-60, 0] (NaN stays NaN): t = n ln2 + r, |r| <= ln2 / 2, e^r by Horner, 2^n by
   its bits. n is rounded to the nearest integer by adding and subtracting 1.5 * 2^(mantissa bits);
   the sum's low bits hold n, so 2^n's exponent field is (those bits + bias) shifted into place,
   with no float-to-integer conversion (AVX2 has none for doubles, which kept loops scalar). */
static inline float exp_f32(float t) {
    float shifted = t * 1.44269504088896341f + 12582912.0f, n = shifted - 12582912.0f;
    float r = (t - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    uint32_t bits;
    memcpy(&bits, &shifted, sizeof bits);
    bits = (bits + 127u) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

static inline double exp_f64(double t) {
    double shifted = t * 1.4426950408889634074 + 6755399441055744.0, n = shifted - 6755399441055744.0;
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
    uint64_t bits;
    memcpy(&bits, &shifted, sizeof bits);
    bits = (bits + 1023u) << 52;
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
/* the negative branch's value, slope and curvature at t = k u, given e = exp(t) */               \
static inline T pila_value_##SUFFIX(T t, T k, T e) {                                              \
    return (((T)0.5 * t - (T)1) * t + (T)1) * t / k * e;                                          \
}                                                                                                 \
static inline T pila_slope_##SUFFIX(T t, T e) {                                                   \
    return ((((T)0.5 * t + (T)0.5) * t - (T)1) * t + (T)1) * e;                                   \
}                                                                                                 \
static inline T pila_curvature_##SUFFIX(T t, T k, T e) {                                          \
    return k * ((T)0.5 * t + (T)2) * t * t * e;                                                   \
}                                                                                                 \
static inline T value_##SUFFIX(T u, T k) {                                                        \
    T t = t_of_##SUFFIX(u, k);                                                                    \
    return u > (T)0 ? u : pila_value_##SUFFIX(t, k, EXP(t));                                      \
}                                                                                                 \
static inline T slope_##SUFFIX(T u, T k) {                                                        \
    T t = t_of_##SUFFIX(u, k);                                                                    \
    return u > (T)0 ? (T)1 : pila_slope_##SUFFIX(t, EXP(t));                                      \
}                                                                                                 \
static inline T curvature_##SUFFIX(T u, T k) {                                                    \
    T t = t_of_##SUFFIX(u, k);                                                                    \
    return u > (T)0 ? (T)0 : pila_curvature_##SUFFIX(t, k, EXP(t));                               \
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
/* f'(u) 1.1 from s = sig(z), z = beta u */                                                       \
static inline T swish_slope_##SUFFIX(T s, T z) { return s + z * s * ((T)1 - s); }                 \
static inline T lipswish_slope_##SUFFIX(T u, T beta) {                                            \
    T z = beta * u;                                                                               \
    return swish_slope_##SUFFIX(sigmoid_##SUFFIX(z), z) / (T)1.1;                                 \
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
                gx[j] += sign * gv[j] * swish_slope_##SUFFIX(s, z) * c;                           \
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

/* The flat Lipschitz DenseNet g of the toy models, value and Jacobian and their backward, one row
   block of DENSE_ROWS samples at a time, features stored column by column ([feature][row]) so that
   every inner loop runs over the block's rows. Layer l reads the features u_l of width w_l,
   h = W_l u_l + b_l (hidden h_l), appends [a1(h), a2(h)] (the activation's two halves); the last
   layer maps the w_L features to d_out outputs. Tangents t_c = du/dx_c propagate alongside:
   dh = W_l t_c, da = [s1 dh, s2 dh] with the halves' slopes s1, s2. params packs W_0, b_0, ...,
   W_L, b_L (row-major); act holds three numbers per layer: CPila (kind 0): k, shift, 1/scale;
   CLipSwish (kind 1): beta, 1/scale. */
#include <stdlib.h>
#define DENSE_ROWS 64

#define DENSE_KERNELS(T, SUFFIX, EXP)                                                             \
/* sum over the block's rows of a[r] b[r], in 16 lanes (vectorised without reassociation) */      \
/* lanes[q] += sum over the row groups of a[r + q] b[r + q]: a sum over the rows kept in 16       \
   lanes, reduced once at the end of a call */                                                    \
static inline void dot_lanes_##SUFFIX(T* lanes, const T* a, const T* b) {                         \
    for (int64_t r = 0; r < DENSE_ROWS; r += 16)                                                  \
        for (int64_t q = 0; q < 16; ++q) lanes[q] += a[r + q] * b[r + q];                         \
}                                                                                                 \
static inline T dot_rows_##SUFFIX(const T* a, const T* b) {                                       \
    T lanes[16] = {0}, s = 0;                                                                     \
    dot_lanes_##SUFFIX(lanes, a, b);                                                              \
    for (int64_t q = 0; q < 16; ++q) s += lanes[q];                                               \
    return s;                                                                                     \
}                                                                                                 \
/* values v1, v2 and slopes s1, s2 of the two halves at the pre-activations h; one simple loop    \
   per quantity, so that each vectorises */                                                       \
static void dense_activate_##SUFFIX(int64_t kind, const T* a, const T* h, T* v1, T* v2, T* s1,    \
                                    T* s2) {                                                      \
    const int64_t R = DENSE_ROWS;                                                                 \
    if (kind == 0) {                                                                              \
        const T k = a[0], shift = a[1], c = a[2];                                                 \
        for (int64_t half = 0; half < 2; ++half) { /* one exponential per element for both */     \
            const T sign = half ? (T)-1 : (T)1;                                                   \
            T* v = half ? v2 : v1; T* s = half ? s2 : s1;                                         \
            for (int64_t r = 0; r < R; ++r) {                                                     \
                T u = sign * h[r] - shift, t = t_of_##SUFFIX(u, k), e = EXP(t);                   \
                v[r] = (u > (T)0 ? u : pila_value_##SUFFIX(t, k, e)) * c;                         \
                s[r] = sign * (u > (T)0 ? (T)1 : pila_slope_##SUFFIX(t, e)) * c;                  \
            }                                                                                     \
        }                                                                                         \
    } else {                                                                                      \
        const T beta = a[0], c = a[1] / (T)1.1;                                                   \
        for (int64_t half = 0; half < 2; ++half) { /* one sigmoid per element gives value and slope */\
            const T sign = half ? (T)-1 : (T)1;                                                   \
            T* v = half ? v2 : v1; T* s = half ? s2 : s1;                                         \
            for (int64_t r = 0; r < R; ++r) {                                                     \
                T u = sign * h[r], z = beta * u, sg = sigmoid_##SUFFIX(z);                        \
                v[r] = u * sg * c; s[r] = sign * swish_slope_##SUFFIX(sg, z) * c;                 \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
}                                                                                                 \
/* gh = d/dh of gv1 v1 + gv2 v2 + gs1 s1 + gs2 s2 (gs1 = NULL: no slope terms), and s1, s2; for   \
   CLipSwish the beta gradient of the same, summed over the rows, is added to *gbeta */           \
static void dense_activation_backward_##SUFFIX(int64_t kind, const T* a, const T* h, const T* gv1,\
        const T* gv2, const T* gs1, const T* gs2, T* gh, T* s1, T* s2, T* gbeta, T* work) {       \
    const int64_t R = DENSE_ROWS;                                                                 \
    if (kind == 0) {                                                                              \
        const T k = a[0], shift = a[1], c = a[2];                                                 \
        for (int64_t r = 0; r < R; ++r) gh[r] = 0;                                                \
        for (int64_t half = 0; half < 2; ++half) { /* slope and curvature from one exponential */ \
            const T sign = half ? (T)-1 : (T)1;                                                   \
            const T* gv = half ? gv2 : gv1; T* s = half ? s2 : s1;                                \
            const T* gs = gs1 ? (half ? gs2 : gs1) : NULL;                                        \
            if (gs) {                                                                             \
                for (int64_t r = 0; r < R; ++r) {                                                 \
                    T u = sign * h[r] - shift, t = t_of_##SUFFIX(u, k), e = EXP(t);               \
                    s[r] = sign * (u > (T)0 ? (T)1 : pila_slope_##SUFFIX(t, e)) * c;              \
                    gh[r] += gv[r] * s[r] + gs[r] * (u > (T)0 ? (T)0 : pila_curvature_##SUFFIX(t, k, e)) * c;\
                }                                                                                 \
            } else {                                                                              \
                for (int64_t r = 0; r < R; ++r) {                                                 \
                    T u = sign * h[r] - shift, t = t_of_##SUFFIX(u, k), e = EXP(t);               \
                    s[r] = sign * (u > (T)0 ? (T)1 : pila_slope_##SUFFIX(t, e)) * c;              \
                    gh[r] += gv[r] * s[r];                                                        \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
        return;                                                                                   \
    }                                                                                             \
    const T beta = a[0], c = a[1] / (T)1.1;                                                       \
    for (int64_t r = 0; r < R; ++r) { gh[r] = 0; work[r] = 0; }                                   \
    for (int half = 0; half < 2; ++half) {                                                        \
        const T sign = half ? (T)-1 : (T)1;                                                       \
        const T* gv = half ? gv2 : gv1;                                                           \
        T* s = half ? s2 : s1;                                                                    \
        const T* gs = gs1 ? (half ? gs2 : gs1) : NULL; /* gs2 is scratch when gs1 is NULL */      \
        if (gs) { /* one sigmoid per element for both terms */                                    \
            for (int64_t r = 0; r < R; ++r) {                                                     \
                T u = sign * h[r], z = beta * u, sg = sigmoid_##SUFFIX(z), ds = sg * ((T)1 - sg); \
                T bend = (T)2 + z * ((T)1 - (T)2 * sg);                                           \
                s[r] = sign * swish_slope_##SUFFIX(sg, z) * c;                                    \
                gh[r] += gv[r] * s[r] + gs[r] * beta * ds * bend * c;                             \
                work[r] += (gv[r] * u * u + sign * gs[r] * u * bend) * ds * c;                    \
            }                                                                                     \
        } else {                                                                                  \
            for (int64_t r = 0; r < R; ++r) {                                                     \
                T u = sign * h[r], z = beta * u, sg = sigmoid_##SUFFIX(z), ds = sg * ((T)1 - sg); \
                s[r] = sign * swish_slope_##SUFFIX(sg, z) * c;                                    \
                gh[r] += gv[r] * s[r];                                                            \
                work[r] += gv[r] * u * u * ds * c;                                                \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
    T ones[DENSE_ROWS];                                                                           \
    for (int64_t r = 0; r < R; ++r) ones[r] = 1;                                                  \
    *gbeta += dot_rows_##SUFFIX(work, ones);                                                      \
}                                                                                                 \
                                                                                                  \
/* Forward of one block: features (w_L x R), tangents (d x w_L x R), pre-activations (H x R) and  \
   their tangents (d x H x R), H the sum of the hidden widths. */                                 \
static void dense_block_##SUFFIX(const T* x, int64_t nb, int64_t d, int64_t layers,               \
        const int64_t* hidden, const T* params, const T* act, int64_t kind, int64_t tangents,     \
        int64_t wt, int64_t ht, T* feat, T* tan, T* pre, T* pretan, T* scratch) {                 \
    const int64_t R = DENSE_ROWS;                                                                 \
    for (int64_t k = 0; k < d; ++k)                                                               \
        for (int64_t r = 0; r < R; ++r) feat[k * R + r] = r < nb ? x[r * d + k] : (T)0;           \
    if (tangents)                                                                                 \
        for (int64_t c = 0; c < d; ++c)                                                           \
            for (int64_t k = 0; k < d; ++k)                                                       \
                for (int64_t r = 0; r < R; ++r) tan[(c * wt + k) * R + r] = c == k ? (T)1 : (T)0; \
    int64_t w = d, hoff = 0;                                                                      \
    const T* p = params;                                                                          \
    T* s1 = scratch; T* s2 = scratch + R;                                                         \
    for (int64_t l = 0; l < layers; ++l) {                                                        \
        const int64_t hl = hidden[l];                                                             \
        const T* W = p; const T* b = p + hl * w;                                                  \
        for (int64_t j = 0; j < hl; ++j) {                                                        \
            T* hj = pre + (hoff + j) * R;                                                         \
            T acc[DENSE_ROWS]; /* a local sum stays in registers: no store-to-load chain over k */\
            for (int64_t r = 0; r < R; ++r) acc[r] = b[j];                                        \
            for (int64_t k = 0; k < w; ++k) {                                                     \
                const T c = W[j * w + k]; const T* fk = feat + k * R;                             \
                for (int64_t r = 0; r < R; ++r) acc[r] += c * fk[r];                              \
            }                                                                                     \
            for (int64_t r = 0; r < R; ++r) hj[r] = acc[r];                                       \
            dense_activate_##SUFFIX(kind, act + 3 * l, hj, feat + (w + j) * R,                    \
                                    feat + (w + hl + j) * R, s1, s2);                             \
            for (int64_t c = 0; tangents && c < d; ++c) {                                         \
                T* tj = pretan + (c * ht + hoff + j) * R;                                         \
                for (int64_t r = 0; r < R; ++r) acc[r] = 0;                                       \
                for (int64_t k = 0; k < w; ++k) {                                                 \
                    const T cw = W[j * w + k]; const T* tk = tan + (c * wt + k) * R;              \
                    for (int64_t r = 0; r < R; ++r) acc[r] += cw * tk[r];                         \
                }                                                                                 \
                for (int64_t r = 0; r < R; ++r) tj[r] = acc[r];                                   \
                T* ta = tan + (c * wt + w + j) * R; T* tb = tan + (c * wt + w + hl + j) * R;      \
                for (int64_t r = 0; r < R; ++r) { ta[r] = s1[r] * tj[r]; tb[r] = s2[r] * tj[r]; } \
            }                                                                                     \
        }                                                                                         \
        p += hl * w + hl; w += 2 * hl; hoff += hl;                                                \
    }                                                                                             \
}                                                                                                 \
                                                                                                  \
static int64_t dense_sizes_##SUFFIX(int64_t d, int64_t layers, const int64_t* hidden, int64_t* ht) { \
    int64_t w = d; *ht = 0;                                                                       \
    for (int64_t l = 0; l < layers; ++l) { w += 2 * hidden[l]; *ht += hidden[l]; }                \
    return w;                                                                                     \
}                                                                                                 \
                                                                                                  \
/* the last layer on one block: out (nb x d_out) and jac (nb x d_out x d, or NULL), row-major */  \
static void dense_output_##SUFFIX(const T* feat, const T* tan, const T* last, int64_t nb, int64_t d,   \
        int64_t d_out, int64_t wt, T* out, T* jac) {                                              \
    const int64_t R = DENSE_ROWS;                                                                 \
    T acc[DENSE_ROWS];                                                                            \
    for (int64_t i = 0; i < d_out; ++i) {                                                         \
        for (int64_t r = 0; r < R; ++r) acc[r] = last[d_out * wt + i];                            \
        for (int64_t k = 0; k < wt; ++k) {                                                        \
            const T c = last[i * wt + k]; const T* fk = feat + k * R;                             \
            for (int64_t r = 0; r < R; ++r) acc[r] += c * fk[r];                                  \
        }                                                                                         \
        for (int64_t r = 0; r < nb; ++r) out[r * d_out + i] = acc[r];                             \
        for (int64_t c = 0; jac && c < d; ++c) {                                                  \
            for (int64_t r = 0; r < R; ++r) acc[r] = 0;                                           \
            for (int64_t k = 0; k < wt; ++k) {                                                    \
                const T cw = last[i * wt + k]; const T* tk = tan + (c * wt + k) * R;              \
                for (int64_t r = 0; r < R; ++r) acc[r] += cw * tk[r];                             \
            }                                                                                     \
            for (int64_t r = 0; r < nb; ++r) jac[(r * d_out + i) * d + c] = acc[r];               \
        }                                                                                         \
    }                                                                                             \
}                                                                                                 \
                                                                                                  \
static T* dense_buffer_##SUFFIX(int64_t d, int64_t wt, int64_t ht, int64_t extra) {                    \
    return malloc(sizeof(T) * (DENSE_ROWS * (wt * (1 + d) + ht * (1 + d) + 3) + extra));          \
}                                                                                                 \
                                                                                                  \
static const T* dense_last_##SUFFIX(const T* params, int64_t d, int64_t layers, const int64_t* hidden) {\
    const T* last = params;                                                                       \
    for (int64_t l = 0, w = d; l < layers; w += 2 * hidden[l], ++l) last += hidden[l] * (w + 1);  \
    return last;                                                                                  \
}                                                                                                 \
                                                                                                  \
/* out (rows x d_out) = g(x); jac (rows x d_out x d, may be NULL) = dg/dx. Returns 0, or 1 when   \
   memory ran out. */                                                                             \
int dense_forward_##SUFFIX(const T* restrict x, T* restrict out, T* restrict jac,                      \
        const int64_t* hidden, const T* params, const T* act, int64_t rows, int64_t d,            \
        int64_t d_out, int64_t layers, int64_t kind) {                                            \
    const int64_t R = DENSE_ROWS;                                                                 \
    int64_t ht, wt = dense_sizes_##SUFFIX(d, layers, hidden, &ht);                                     \
    T* buffer = dense_buffer_##SUFFIX(d, wt, ht, 0);                                                   \
    if (!buffer) return 1;                                                                        \
    T* feat = buffer; T* tan = feat + wt * R; T* pre = tan + d * wt * R;                          \
    T* pretan = pre + ht * R; T* scratch = pretan + d * ht * R;                                   \
    const T* last = dense_last_##SUFFIX(params, d, layers, hidden);                                    \
    for (int64_t r0 = 0; r0 < rows; r0 += R) {                                                    \
        const int64_t nb = rows - r0 < R ? rows - r0 : R;                                         \
        dense_block_##SUFFIX(x + r0 * d, nb, d, layers, hidden, params, act, kind, jac != NULL, wt,    \
                        ht, feat, tan, pre, pretan, scratch);                                     \
        dense_output_##SUFFIX(feat, tan, last, nb, d, d_out, wt, out + r0 * d_out,                     \
                         jac ? jac + r0 * d_out * d : NULL);                                      \
    }                                                                                             \
    free(buffer);                                                                                 \
    return 0;                                                                                     \
}                                                                                                 \
                                                                                                  \
/* z = the result of `steps` Newton steps for z + s g(z) = b from z = b (d = d_out = 1 or 2):     \
   z <- z - (I + s J(z))^-1 (z + s g(z) - b). Returns 0, 1 when memory ran out, 2 for d > 2. */   \
int dense_newton_##SUFFIX(const T* restrict b, T* restrict z, const int64_t* hidden, const T* params,  \
        const T* act, int64_t rows, int64_t d, int64_t steps, int64_t layers, int64_t kind,       \
        int64_t negative) {                                                                       \
    const int64_t R = DENSE_ROWS;                                                                 \
    const T s = negative ? (T)-1 : (T)1;                                                          \
    if (d > 2) return 2;                                                                          \
    int64_t ht, wt = dense_sizes_##SUFFIX(d, layers, hidden, &ht);                                     \
    T* buffer = dense_buffer_##SUFFIX(d, wt, ht, R * (d + d * d));                                     \
    if (!buffer) return 1;                                                                        \
    T* feat = buffer; T* tan = feat + wt * R; T* pre = tan + d * wt * R;                          \
    T* pretan = pre + ht * R; T* scratch = pretan + d * ht * R;                                   \
    T* value = scratch + 3 * R; T* jac = value + R * d;                                           \
    const T* last = dense_last_##SUFFIX(params, d, layers, hidden);                                    \
    for (int64_t r0 = 0; r0 < rows; r0 += R) {                                                    \
        const int64_t nb = rows - r0 < R ? rows - r0 : R;                                         \
        const T* bb = b + r0 * d; T* zb = z + r0 * d;                                             \
        for (int64_t i = 0; i < nb * d; ++i) zb[i] = bb[i];                                       \
        for (int64_t step = 0; step < steps; ++step) {                                            \
            dense_block_##SUFFIX(zb, nb, d, layers, hidden, params, act, kind, 1, wt, ht, feat, tan,   \
                            pre, pretan, scratch);                                                \
            dense_output_##SUFFIX(feat, tan, last, nb, d, d, wt, value, jac);                          \
            for (int64_t r = 0; r < nb; ++r) {                                                    \
                if (d == 1) {                                                                     \
                    zb[r] -= (zb[r] + s * value[r] - bb[r]) / ((T)1 + s * jac[r]);                \
                } else {                                                                          \
                    const T* J = jac + 4 * r;                                                     \
                    T a = (T)1 + s * J[0], e = s * J[1], c = s * J[2], f = (T)1 + s * J[3];       \
                    T r1 = zb[2 * r] + s * value[2 * r] - bb[2 * r];                              \
                    T r2 = zb[2 * r + 1] + s * value[2 * r + 1] - bb[2 * r + 1];                  \
                    T det = a * f - e * c;                                                        \
                    zb[2 * r] -= (f * r1 - e * r2) / det;                                         \
                    zb[2 * r + 1] -= (a * r2 - c * r1) / det;                                     \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
    free(buffer);                                                                                 \
    return 0;                                                                                     \
}                                                                                                 \
/* The backward of dense_forward: with gy = grad_out and gj = grad_jac (NULL: the value only),    \
   grad_x = d/dx and grad_params, grad_act (the beta of each CLipSwish layer) += d/dparams,        \
   d/dbeta of <gy, g(x)> + <gj, dg/dx>. Returns 0, or 1 when memory ran out. */                   \
int dense_backward_##SUFFIX(const T* restrict x, const T* restrict grad_out,                      \
        const T* restrict grad_jac, T* restrict grad_x, T* restrict grad_params,                  \
        T* restrict grad_act, const int64_t* hidden, const T* params, const T* act, int64_t rows, \
        int64_t d, int64_t d_out, int64_t layers, int64_t kind) {                                 \
    const int64_t R = DENSE_ROWS, tangents = grad_jac != NULL;                                    \
    int64_t ht, wt = dense_sizes_##SUFFIX(d, layers, hidden, &ht);                                \
    T* buffer = malloc(sizeof(T) * R * (2 * wt * (1 + d) + ht * (1 + d) + 8));                \
    if (!buffer) return 1;                                                                        \
    T* feat = buffer; T* tan = feat + wt * R; T* pre = tan + d * wt * R;                          \
    T* pretan = pre + ht * R; T* gfeat = pretan + d * ht * R; T* gtan = gfeat + wt * R;           \
    T* scratch = gtan + d * wt * R;                                                               \
    T* gy = scratch; T* gh = scratch + R; T* s1 = scratch + 2 * R; T* s2 = scratch + 3 * R;       \
    T* gs1 = scratch + 4 * R; T* gs2 = scratch + 5 * R; T* th = scratch + 6 * R;                  \
    T* work = scratch + 7 * R;                                                                    \
    int64_t offsets[layers + 1], widths[layers + 1], hoffs[layers + 1];                           \
    offsets[0] = 0; widths[0] = d; hoffs[0] = 0;                                                  \
    for (int64_t l = 0; l < layers; ++l) {                                                        \
        offsets[l + 1] = offsets[l] + hidden[l] * (widths[l] + 1);                                \
        widths[l + 1] = widths[l] + 2 * hidden[l]; hoffs[l + 1] = hoffs[l] + hidden[l];           \
    }                                                                                             \
    const T* last = params + offsets[layers];                                                     \
    const int64_t nparams = offsets[layers] + d_out * (wt + 1);                                   \
    T* lanes = calloc(16 * nparams, sizeof(T)); /* the parameters' gradients, 16 lanes each */    \
    if (!lanes) { free(buffer); return 1; }                                                       \
    T* glast = lanes + 16 * offsets[layers];                                                      \
    T ones[DENSE_ROWS];                                                                           \
    for (int64_t r = 0; r < R; ++r) ones[r] = 1;                                                  \
    for (int64_t r0 = 0; r0 < rows; r0 += R) {                                                    \
        const int64_t nb = rows - r0 < R ? rows - r0 : R;                                         \
        dense_block_##SUFFIX(x + r0 * d, nb, d, layers, hidden, params, act, kind, tangents, wt,  \
                             ht, feat, tan, pre, pretan, scratch);                                \
        for (int64_t i = 0; i < wt * R * (1 + d); ++i) gfeat[i] = 0;                              \
        for (int64_t i = 0; i < d_out; ++i) {                                                     \
            for (int64_t c = -1; c < (tangents ? d : 0); ++c) {                                   \
                /* c = -1: the value's gradient; c >= 0: that of the Jacobian's column c */       \
                for (int64_t r = 0; r < R; ++r)                                                   \
                    gy[r] = r >= nb ? (T)0 : c < 0 ? (grad_out ? grad_out[(r0 + r) * d_out + i] : (T)0) \
                                               : grad_jac[((r0 + r) * d_out + i) * d + c];        \
                const T* src = c < 0 ? feat : tan + c * wt * R;                                   \
                T* dst = c < 0 ? gfeat : gtan + c * wt * R;                                       \
                if (c < 0) dot_lanes_##SUFFIX(glast + 16 * (d_out * wt + i), gy, ones);           \
                for (int64_t k = 0; k < wt; ++k) {                                                \
                    const T cw = last[i * wt + k]; const T* fk = src + k * R; T* gk = dst + k * R;\
                    dot_lanes_##SUFFIX(glast + 16 * (i * wt + k), gy, fk);                        \
                    for (int64_t r = 0; r < R; ++r) gk[r] += cw * gy[r];                          \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
        for (int64_t l = layers - 1; l >= 0; --l) {                                               \
            const int64_t hl = hidden[l], w = widths[l], hoff = hoffs[l];                         \
            const T* W = params + offsets[l]; T* gW = lanes + 16 * offsets[l];                    \
            T* gb = gW + 16 * hl * w;                                                             \
            for (int64_t j = 0; j < hl; ++j) {                                                    \
                const T* hj = pre + (hoff + j) * R;                                               \
                if (tangents) {                                                                   \
                    for (int64_t r = 0; r < R; ++r) { gs1[r] = 0; gs2[r] = 0; }                   \
                    for (int64_t c = 0; c < d; ++c) {                                             \
                        const T* tj = pretan + (c * ht + hoff + j) * R;                           \
                        const T* ga = gtan + (c * wt + w + j) * R;                                \
                        const T* gb2 = gtan + (c * wt + w + hl + j) * R;                          \
                        for (int64_t r = 0; r < R; ++r) { gs1[r] += ga[r] * tj[r]; gs2[r] += gb2[r] * tj[r]; } \
                    }                                                                             \
                }                                                                                 \
                dense_activation_backward_##SUFFIX(kind, act + 3 * l, hj, gfeat + (w + j) * R,    \
                    gfeat + (w + hl + j) * R, tangents ? gs1 : NULL, gs2, gh, s1, s2,             \
                    grad_act + l, work);                                                          \
                dot_lanes_##SUFFIX(gb + 16 * j, gh, ones);                                        \
                for (int64_t k = 0; k < w; ++k) {                                                 \
                    const T cw = W[j * w + k]; const T* fk = feat + k * R; T* gk = gfeat + k * R; \
                    dot_lanes_##SUFFIX(gW + 16 * (j * w + k), gh, fk);                            \
                    for (int64_t r = 0; r < R; ++r) gk[r] += cw * gh[r];                          \
                }                                                                                 \
                for (int64_t c = 0; tangents && c < d; ++c) {                                     \
                    const T* ga = gtan + (c * wt + w + j) * R;                                    \
                    const T* gb2 = gtan + (c * wt + w + hl + j) * R;                              \
                    for (int64_t r = 0; r < R; ++r) th[r] = ga[r] * s1[r] + gb2[r] * s2[r];       \
                    for (int64_t k = 0; k < w; ++k) {                                             \
                        const T cw = W[j * w + k]; const T* tk = tan + (c * wt + k) * R;          \
                        T* gk = gtan + (c * wt + k) * R;                                          \
                        dot_lanes_##SUFFIX(gW + 16 * (j * w + k), th, tk);                        \
                        for (int64_t r = 0; r < R; ++r) gk[r] += cw * th[r];                      \
                    }                                                                             \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
        for (int64_t r = 0; r < nb; ++r)                                                          \
            for (int64_t k = 0; k < d; ++k) grad_x[(r0 + r) * d + k] = gfeat[k * R + r];         \
    }                                                                                             \
    for (int64_t i = 0; i < nparams; ++i) {                                                       \
        T sum = 0;                                                                                \
        for (int64_t q = 0; q < 16; ++q) sum += lanes[16 * i + q];                                \
        grad_params[i] += sum;                                                                    \
    }                                                                                             \
    free(lanes);                                                                                  \
    free(buffer);                                                                                 \
    return 0;                                                                                     \
}

DENSE_KERNELS(float, f32, exp_f32)
DENSE_KERNELS(double, f64, exp_f64)
"""

#: ``-fno-trapping-math``: the selects between an activation's branches (``u > 0 ? u : ...``)
#: vectorise only where the compiler may evaluate both branches; without it, only CPUs with masked
#: vector operations (AVX-512) vectorised them, and AVX2 machines ran the activations scalar. The
#: kernels read no floating-point exception flags, and the values do not change.
_FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-shared", "-fPIC")
_PORTABLE_FLAGS = ("-O3", "-fno-trapping-math", "-shared", "-fPIC")
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_CTYPE = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}
#: each C function's arguments: (pointers, int64 sizes, scalars of the tensors' type, result type)
_SIGNATURES = {"cpila_forward": (3, 2, 3, None), "cpila_backward": (4, 2, 3, None),
               "lipswish_forward": (3, 3, 2, None), "lipswish_backward": (5, 3, 2, None),
               "dense_forward": (6, 5, 0, ctypes.c_int), "dense_backward": (9, 5, 0, ctypes.c_int),
               "dense_newton": (5, 6, 0, ctypes.c_int)}

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
        for name, (pointers, integers, scalars, result) in _SIGNATURES.items():
            function = getattr(library, f"{name}_{suffix}")
            function.restype = result
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
    """torch.func transforms, or a Python dispatch mode (FLOP counting, fake tensors) that must see
    every operator: the kernels' ctypes calls would hide theirs."""
    return (getattr(torch._C, "_are_functorch_transforms_active", lambda: False)()
            or getattr(torch._C, "_len_torch_dispatch_stack", lambda: 0)() > 0)


def applicable(x: Tensor) -> bool:
    """Whether the fused kernels compute for ``x``: a plain CPU tensor of float32 or float64 with
    at least 2 dimensions, outside ``torch.compile``, ``torch.func`` transforms and Python dispatch
    modes (:mod:`monoflow.flop_count`), with the kernels switched on and available."""
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


def _in_row_blocks(function: Any, rows: int, workers: int, row_tensors: Sequence[Optional[Tensor]],
                   tail: Sequence[Any], accumulators: Sequence[Tensor] = (), shared: Sequence[Tensor] = ()) -> List[Any]:
    """``function(row pointers, accumulator pointers, shared pointers, rows, *tail)`` on ``row_tensors``
    (first dimension ``rows``; ``None``: a null pointer): once, or with ``workers >= 2`` once per block of
    rows on torch's intra-op threads (:mod:`ctypes` releases the GIL, so the blocks run in parallel),
    each with its private copy of the ``accumulators`` (summed into them afterwards). The calls' results."""
    if workers < 2:
        return [function(*[None if t is None else t.data_ptr() for t in (*row_tensors, *accumulators, *shared)],
                         rows, *tail)]
    row_bytes = [None if t is None else (t.numel() // rows) * t.element_size() for t in row_tensors]
    private = [torch.zeros((workers,) + tuple(t.shape), dtype=t.dtype) for t in accumulators]

    def call(worker: int, start: int, stop: int) -> Any:
        pointers = [None if t is None else t.data_ptr() + start * size for t, size in zip(row_tensors, row_bytes)]
        return function(*pointers, *[p[worker].data_ptr() for p in private], *[t.data_ptr() for t in shared],
                        stop - start, *tail)

    bounds = [rows * i // workers for i in range(workers + 1)]
    results = list(_executor(workers).map(call, range(workers), bounds[:-1], bounds[1:]))
    for accumulator, copies in zip(accumulators, private):
        accumulator += copies.sum(0)
    return results


def _run(name: str, rows: int, tensors: Sequence[Optional[Tensor]], integers: Sequence[int],
         scalars: Sequence[float]) -> None:
    """Call the C function ``name`` (for the first tensor's dtype) on contiguous ``tensors`` whose
    first dimension is ``rows`` (``None``: a null pointer), then ``rows``, ``integers`` and
    ``scalars``. Inputs of at least :data:`PARALLEL_ELEMENTS` are split into blocks of rows, one per
    intra-op thread of torch (``torch.get_num_threads``)."""
    workers = min(torch.get_num_threads(), rows) if tensors[0].numel() >= PARALLEL_ELEMENTS else 1
    _in_row_blocks(_functions[(name, tensors[0].dtype)], rows, workers, tensors, [*integers, *scalars])


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


#: the activations of :func:`dense_forward`: CPila (k, shift, 1/scale) and CLipSwish (beta, 1/scale)
DENSE_ACTIVATIONS = {"cpila": 0, "clipswish": 1}
#: a dense network of at least this many rows is split into row blocks over torch's intra-op threads
DENSE_PARALLEL_ROWS = 1024


def _dense_call(name: str, rows: int, row_tensors: Sequence[Optional[Tensor]], shared: Sequence[Tensor],
                integers: Sequence[int], accumulators: Sequence[Tensor] = ()) -> None:
    """Call the dense kernel ``name`` on ``row_tensors`` (first dimension ``rows``; ``None``: a null
    pointer), then ``accumulators`` (summed into, one private copy per thread), then ``shared``;
    at least :data:`DENSE_PARALLEL_ROWS` rows are split over torch's threads. Raises ``MemoryError``
    when the kernel could not allocate its block buffers."""
    workers = 1 if rows < DENSE_PARALLEL_ROWS else min(torch.get_num_threads(), rows // (DENSE_PARALLEL_ROWS // 2))
    if any(_in_row_blocks(_functions[(name, shared[-1].dtype)], rows, workers, row_tensors, integers,
                          accumulators, shared)):
        raise MemoryError(f"monoflow.kernels.{name}: out of memory for its block buffers")


def dense_forward(x: Tensor, params: Tensor, hidden: Tensor, act: Tensor, d_out: int, kind: int,
                  with_jacobian: bool) -> Tuple[Tensor, Optional[Tensor]]:
    r"""``(g(x), dg/dx or None)`` of a flat dense network (C source above) at ``x`` (B, d): ``params``
    packs each layer's (folded) weight and bias, ``hidden`` (int64) the layers' hidden widths,
    ``act`` (layers, 3) the activations' constants; the Jacobian is (B, d_out, d). No autograd;
    call only where :func:`applicable` holds for ``x``."""
    x = x.detach().contiguous()
    rows, d = x.shape
    out = torch.empty(rows, d_out, dtype=x.dtype)
    jac = torch.empty(rows, d_out, d, dtype=x.dtype) if with_jacobian else None
    _dense_call("dense_forward", rows, [x, out, jac], [hidden, params.detach().contiguous(), act],
                [d, d_out, hidden.numel(), kind])
    return out, jac


def dense_backward(x: Tensor, grad_out: Optional[Tensor], grad_jac: Optional[Tensor], params: Tensor, hidden: Tensor,
                   act: Tensor, d_out: int, kind: int) -> Tuple[Tensor, Tensor, Tensor]:
    r"""The gradients with respect to ``x``, ``params`` and each layer's CLipSwish :math:`\beta` (zero for
    CPila) of :math:`\langle \bar y, g(x)\rangle + \langle \bar J, \partial g/\partial x\rangle` for
    :func:`dense_forward`'s outputs; ``grad_jac=None``: the value's gradient only, ``grad_out=None``:
    zero. No autograd."""
    x = x.detach().contiguous()
    rows, d = x.shape
    grad_out = None if grad_out is None else grad_out.detach().contiguous().to(x.dtype)
    grad_jac = None if grad_jac is None else grad_jac.detach().contiguous().to(x.dtype)
    grad_x = torch.empty_like(x)
    grad_params = torch.zeros(params.shape, dtype=x.dtype)
    grad_act = torch.zeros(hidden.numel(), dtype=x.dtype)
    _dense_call("dense_backward", rows, [x, grad_out, grad_jac, grad_x], [hidden, params.detach().contiguous(), act],
                [d, d_out, hidden.numel(), kind], accumulators=[grad_params, grad_act])
    return grad_x, grad_params, grad_act


def dense_newton(b: Tensor, params: Tensor, hidden: Tensor, act: Tensor, kind: int, steps: int,
                 sign: float) -> Tensor:
    r"""``steps`` Newton steps for :math:`z + s\,g(z) = b` from :math:`z = b` for the dense network of
    :func:`dense_forward` (d = 1 or 2 outputs and inputs), each
    :math:`z \leftarrow z - (I + s J(z))^{-1}(z + s\,g(z) - b)` with the closed-form 2x2 solve. No
    autograd."""
    b = b.detach().contiguous()
    rows, d = b.shape
    if d > 2:
        raise ValueError(f"dense_newton solves 1 or 2 dimensions, got {d}")
    z = torch.empty_like(b)
    _dense_call("dense_newton", rows, [b, z], [hidden, params.detach().contiguous(), act],
                [d, steps, hidden.numel(), kind, int(sign < 0)])
    return z
