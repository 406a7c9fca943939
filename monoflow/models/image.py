r"""The multi-scale image flow of Table 2 and its named presets.

Architecture (the Residual-Flow multi-scale layout the paper's release used; SPEC.md section 4)::

    integer image k --dequantise--> x = (k + u)/L in [0,1]^D
      -> logit transform (alpha)            [Normalize for classification]
      -> squeeze                            [only with squeeze_first]
      scale 1: ActNorm, n_1 x (block, ActNorm), squeeze          [factor out half]
      scale 2:          n_2 x (block, ActNorm), squeeze          [factor out half]
      ...
      last scale:       n_s x (block, ActNorm), 4 x (FC block, ActNorm over all of C*H*W)
      -> z ~ N(0, I)

A *block* is a :class:`~monoflow.blocks.MonotoneBlock` (the paper's model) or a
:class:`~monoflow.blocks.ResidualBlock` (i-DenseNet) with g an i-DenseNet: ``depth`` dense
layers of 3x3 spectral-normalised convolutions of growth ``growth`` and a 1x1 convolution back
(:func:`~monoflow.lipschitz.dense_convnet`). An FC block's g is Linear(D -> 64), ``depth`` dense
layers of growth 32 and a Linear back to D. Log-dets: Poisson(2) Russian roulette with 10 exact
terms in training and 20 in evaluation, Neumann gradient, memory-efficient mode.

With these rules the presets reproduce the parameter counts of SPEC.md exactly (a test checks
them): 20,872,826 MNIST; 24,894,430 CIFAR-10; 46,980,574 ImageNet32; 48,907,888 ImageNet64;
24,894,586 i-DenseNet on CIFAR-10 (one LipSwish beta per activation, 156 of them); 46,891,648 for
CIFAR-10 with variational dequantisation (three conditional blocks). Counted facts that matter:
an ActNorm at the very start of the first scale, ActNorm after every FC block over all C*H*W
features, biases in every convolution / linear map, two concatenation scales per dense layer.

Bits per dimension: :math:`-(\log p(z) + \sum\log|\det| - D\log L - \log q(u|k))/(D\ln2)`,
L = 256 for 8-bit images (17 for scikit-learn's digits).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from monoflow.activations import make_activation
from monoflow.blocks import ActNorm, MonotoneBlock, ResidualBlock
from monoflow.flows import StandardNormal
from monoflow.activations import LipSwish
from monoflow.lipschitz import (DenseNet, LipschitzChain, LipschitzDenseLayer, SpectralNormConv2d, SpectralNormLinear,
                                dense_convnet, reuse_parameter_transforms)
from monoflow.models.toy import lipswish_mlp
from monoflow.logdet import LogDetEstimator, RussianRouletteLogDet, make_estimator
from monoflow.solvers import SolverOptions
from monoflow.transforms import (
    Flatten,
    LogitTransform,
    Normalize,
    Squeeze,
    UniformDequantization,
    VariationalDequantization,
)

__all__ = [
    "MODEL_VARIANTS",
    "ImageFlowConfig",
    "ImageTrainingConfig",
    "ImagePreset",
    "ImageFlow",
    "image_flow",
    "list_image_presets",
    "get_image_preset",
    "count_parameters",
    "ImageExactLogDet",
    "CPU_TABLE2_MODELS",
    "CPU_ABLATION_MODELS",
]

#: model name -> (block, activation): the paper's two models, the two mixed ablation rows and
#: Residual Flow (residual blocks whose g is a plain LipSwish conv net, not a dense net)
MODEL_VARIANTS: Dict[str, Tuple[str, str]] = {
    "monotone": ("monotone", "cpila"),
    "idensenet": ("residual", "clipswish"),
    "residual-cpila": ("residual", "cpila"),
    "monotone-clipswish": ("monotone", "clipswish"),
    "resflow": ("residual", "lipswish"),
}

#: the g of each activation: LipSwish (Residual Flow) uses a plain chain, the others a dense net
_CHAIN_ACTIVATIONS = ("lipswish",)

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


@dataclass(frozen=True)
class ImageFlowConfig:
    """Architecture of a multi-scale image flow (defaults: the paper's CIFAR-10 model)."""

    image_shape: Tuple[int, int, int] = (3, 32, 32)
    n_levels: int = 256
    blocks: Tuple[int, ...] = (16, 16, 16)
    block: str = "monotone"  # "monotone" | "residual"
    activation: str = "cpila"
    depth: int = 3
    growth: int = 172
    coeff: float = 0.98
    lip_coeff: float = 0.98
    actnorm: bool = True
    first_actnorm: bool = True
    squeeze_first: bool = False
    factor_out: bool = False
    fc_end: bool = True
    fc_blocks: int = 4
    fc_first: int = 64
    fc_growth: int = 32
    # Residual Flow's g (activation "lipswish"): 3x3 conv -> LipSwish -> 1x1 conv -> LipSwish ->
    # 3x3 conv with this many hidden channels; FC g: Linear layers with two hidden layers of fc_first
    resflow_hidden: int = 512
    preprocessing: str = "logit"  # "logit" | "normalize"
    logit_alpha: float = 0.05
    dequantization: str = "uniform"  # "uniform" | "variational"
    vardeq_blocks: int = 3
    vardeq_cond_channels: int = 64
    vardeq_hidden: int = 512
    vardeq_bottlenecks: int = 3
    task: str = "density"  # "density" | "classification"
    classification_hidden: int = 256
    n_classes: int = 10
    # log-det estimation (SPEC.md section 2/4)
    logdet: str = "russian_roulette"  # or "exact" (tiny test models), "power_series"
    roulette_lam: float = 2.0
    n_exact_terms: int = 10
    eval_n_exact_terms: int = 20
    n_probes: int = 1
    neumann_gradient: bool = True
    memory_efficient: bool = True
    solver_max_iterations: int = 100
    # stopping tolerances of the monotone blocks' solves, 0 for the dtype's default (1e-5 in float32):
    # the forward solve's rtol (atol = rtol / 10) and the adjoint's; benchmarks/solver_tolerance.py
    solver_rtol: float = 0.0
    adjoint_rtol: float = 0.0

    def __post_init__(self) -> None:
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W), got {self.image_shape}")
        if self.block not in ("monotone", "residual"):
            raise ValueError(f"block must be 'monotone' or 'residual', got {self.block!r}")
        if not self.blocks or min(self.blocks) < 0:
            raise ValueError(f"blocks must be a non-empty tuple of block counts per scale, got {self.blocks}")
        if self.preprocessing not in ("logit", "normalize"):
            raise ValueError(f"preprocessing must be 'logit' or 'normalize', got {self.preprocessing!r}")
        if self.dequantization not in ("uniform", "variational"):
            raise ValueError(f"dequantization must be 'uniform' or 'variational', got {self.dequantization!r}")
        if self.task not in ("density", "classification"):
            raise ValueError(f"task must be 'density' or 'classification', got {self.task!r}")
        if self.logdet not in ("russian_roulette", "exact", "power_series"):
            raise ValueError(f"logdet must be 'russian_roulette', 'exact' or 'power_series', got {self.logdet!r}")
        for name in ("solver_rtol", "adjoint_rtol"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1) (0: the dtype's default), got {getattr(self, name)}")
        make_activation(self.activation)  # validates the name

    @property
    def dim(self) -> int:
        c, h, w = self.image_shape
        return c * h * w

    def solver_options(self) -> Tuple[SolverOptions, Optional[SolverOptions]]:
        """(forward, adjoint) settings of every block's solves: ``solver_rtol`` with ``atol = rtol / 10``
        and ``adjoint_rtol`` with ``atol = 0``, each 0 for the dtype's default (adjoint ``None``:
        :data:`~monoflow.implicit.DEFAULT_ADJOINT`)."""
        rtol, adjoint_rtol = self.solver_rtol, self.adjoint_rtol
        tolerance = dict(atol=rtol / 10, rtol=rtol) if rtol > 0 else {}
        forward = SolverOptions(max_iterations=self.solver_max_iterations, **tolerance)
        return forward, SolverOptions(atol=0.0, rtol=adjoint_rtol) if adjoint_rtol > 0 else None

    def with_model(self, model: str) -> "ImageFlowConfig":
        """The same architecture with the block/activation of ``model`` (see :data:`MODEL_VARIANTS`)."""
        if model not in MODEL_VARIANTS:
            raise ValueError(f"unknown model {model!r}; expected one of {sorted(MODEL_VARIANTS)}")
        block, activation = MODEL_VARIANTS[model]
        return replace(self, block=block, activation=activation)

    @property
    def model_name(self) -> str:
        for name, pair in MODEL_VARIANTS.items():
            if pair == (self.block, self.activation.lower()):
                return name
        return f"{self.block}-{self.activation}"


@dataclass(frozen=True)
class ImageTrainingConfig:
    """Optimisation settings (defaults: SPEC.md section 4, the CIFAR-10 run)."""

    batch_size: int = 64  # global batch (all ranks together), per optimiser step / accumulation
    accumulation_steps: int = 1
    lr: float = 1e-3
    betas: Tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    warmup_iterations: int = 1000
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    epochs: int = 1000  # the release's default --nepochs; override with iterations
    iterations: Optional[int] = None
    random_flip: bool = False
    random_crop_padding: int = 0
    start_learnable_concat_epoch: int = 25
    lipschitz_tol: float = 1e-3
    lipschitz_max_iterations: int = 200
    eval_batch_size: int = 200
    eval_every: int = 5000  # iterations; 0 = only at the end
    n_eval_draws: int = 3  # repeated passes over the test set with fresh estimator draws
    eval_curve_images: int = 0  # evaluations during training: one draw on this many test images (0: as at the end)
    checkpoint_every: int = 500  # iterations
    log_every: int = 20
    n_samples: int = 64

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.accumulation_steps < 1:
            raise ValueError("batch_size and accumulation_steps must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.n_eval_draws < 1:
            raise ValueError("n_eval_draws must be >= 1")


@dataclass(frozen=True)
class ImagePreset:
    """A named run: data set, architecture, training settings and the paper's numbers."""

    name: str
    dataset: str
    model: ImageFlowConfig
    training: ImageTrainingConfig
    description: str
    scale: str = "paper"
    paper_bpd: Optional[float] = None
    paper_params: Optional[int] = None
    paper_accuracy: Optional[float] = None
    notes: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# the model


class _ClassificationHead(nn.Module):
    """Conv 3x3 -> ActNorm -> ReLU -> global average pool (one per scale)."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, hidden, 3, padding=1)
        self.norm = ActNorm(hidden)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.norm(self.conv(x), with_logdet=False)
        return torch.relu(h).mean(dim=(2, 3))


class ImageExactLogDet(LogDetEstimator):
    """Exact log-det for tiny image models: the full Jacobian of g on (B, C, H, W) inputs by
    autograd (D <= ``max_dim``) and the series' exact formula. For tests and toy sizes only."""

    def __init__(self, max_dim: int = 256) -> None:
        self.max_dim = max_dim

    def __call__(self, g: nn.Module, w: Tensor, series, training: bool, cache: Optional[dict] = None) -> Tensor:
        shape = w.shape
        d = w[0].numel()
        if d > self.max_dim:
            raise ValueError(f"logdet='exact' builds the full {d}x{d} Jacobian; allowed up to d={self.max_dim}")
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            w_ = w if w.requires_grad else w.detach().requires_grad_(True)
            out = g(w_).reshape(shape[0], d)
            rows = []
            for i in range(d):
                (row,) = torch.autograd.grad(out[:, i].sum(), w_, create_graph=create_graph, retain_graph=True)
                rows.append(row.reshape(shape[0], d))
        return series.exact(torch.stack(rows, dim=1))


def _estimator(config: ImageFlowConfig) -> Optional[LogDetEstimator]:
    if config.task == "classification":
        return None
    if config.logdet == "russian_roulette":
        return RussianRouletteLogDet(
            distribution="poisson", lam=config.roulette_lam, n_exact_terms=config.n_exact_terms,
            eval_n_exact_terms=config.eval_n_exact_terms, n_probes=config.n_probes,
            gradient="neumann" if config.neumann_gradient else "backprop",
            memory_efficient=config.memory_efficient,
        )
    if config.logdet == "exact":
        return ImageExactLogDet()
    return make_estimator(config.logdet)


def _lipswish_convnet(channels: int, config: ImageFlowConfig) -> LipschitzChain:
    """Residual Flow's conv g: 3x3 conv to ``resflow_hidden`` channels, LipSwish, 1x1 conv,
    LipSwish, 3x3 conv back; Lip <= product of the layers' bounds."""
    h, c = config.resflow_hidden, config.coeff
    return LipschitzChain(SpectralNormConv2d(channels, h, 3, coeff=c), LipSwish(),
                          SpectralNormConv2d(h, h, 1, coeff=c), LipSwish(), SpectralNormConv2d(h, channels, 3, coeff=c))


def _conv_g(channels: int, config: ImageFlowConfig) -> nn.Module:
    """The g of a convolutional block: a dense net (CPila / CLipSwish) or Residual Flow's chain."""
    if config.activation.lower() in _CHAIN_ACTIVATIONS:
        return _lipswish_convnet(channels, config)
    return dense_convnet(channels, config.depth, config.growth, config.activation, coeff=config.coeff,
                         lip_coeff=config.lip_coeff, kernel_size=3, final_kernel_size=1)


def _fc_g(dim: int, config: ImageFlowConfig) -> nn.Module:
    """The g of a fully connected end block (dense net, or Residual Flow's LipSwish MLP)."""
    if config.activation.lower() in _CHAIN_ACTIVATIONS:
        return lipswish_mlp(dim, [config.fc_first, config.fc_first], coeff=config.coeff)
    return _fc_densenet(dim, config)


def _fc_densenet(dim: int, config: ImageFlowConfig) -> DenseNet:
    """FC g: Linear(dim -> fc_first), ``depth`` dense layers of growth ``fc_growth``, Linear back."""
    layers: List[nn.Module] = [SpectralNormLinear(dim, config.fc_first, coeff=config.coeff)]
    width = config.fc_first
    for _ in range(config.depth):
        act = make_activation(config.activation)
        out = config.fc_growth // 2 if act.concatenates else config.fc_growth
        layers.append(LipschitzDenseLayer(SpectralNormLinear(width, out, coeff=config.coeff), act, config.lip_coeff))
        width += config.fc_growth
    layers.append(SpectralNormLinear(width, dim, coeff=config.coeff))
    return DenseNet(layers)


class ImageFlow(nn.Module):
    r"""Multi-scale flow on images (see the module docstring for the layout).

    ``z, logdet = flow(x)`` maps dequantised images x in [0,1] (B, C, H, W) to flat latents
    (B, D) (factored-out parts first, in the order they leave); ``flow.inverse(z)`` undoes it.
    :meth:`bits_per_dim` runs the whole likelihood from integer images; :meth:`classify` gives
    class logits for the classification variant.
    """

    def __init__(self, config: ImageFlowConfig) -> None:
        super().__init__()
        self.config = config
        c, h, w = config.image_shape
        if config.dequantization == "uniform":
            self.dequantizer: nn.Module = UniformDequantization(config.n_levels)
        else:
            self.dequantizer = VariationalDequantization(
                c, config.n_levels, config.vardeq_blocks, config.depth, config.growth, config.activation,
                config.coeff, config.lip_coeff, config.vardeq_cond_channels, config.vardeq_hidden,
                config.vardeq_bottlenecks, logdet=_estimator(replace(config, task="density")),
            )
        pre: List[nn.Module] = []
        if config.preprocessing == "logit":
            pre.append(LogitTransform(config.logit_alpha))
        else:
            mean = CIFAR_MEAN if c == 3 else (0.5,) * c
            std = CIFAR_STD if c == 3 else (0.25,) * c
            pre.append(Normalize(mean, std))
        if config.squeeze_first:
            pre.append(Squeeze(2))
            c, h, w = 4 * c, h // 2, w // 2
        self.preprocess = nn.ModuleList(pre)

        n_scales = len(config.blocks)
        if h % 2 ** (n_scales - 1) or w % 2 ** (n_scales - 1):
            raise ValueError(
                f"{n_scales} scales squeeze {n_scales - 1} times, so the image side (after any first "
                f"squeeze) must be divisible by {2 ** (n_scales - 1)}; got {h}x{w}"
            )
        scales, factored_shapes, head_channels = [], [], []
        for i, n_blocks in enumerate(config.blocks):
            layers: List[nn.Module] = []
            if i == 0 and config.first_actnorm and config.actnorm:
                layers.append(ActNorm(c))
            for _ in range(n_blocks):
                layers.append(self._block(_conv_g(c, config)))
                if config.actnorm:
                    layers.append(ActNorm(c))
            if i < n_scales - 1:
                layers.append(Squeeze(2))
                c, h, w = 4 * c, h // 2, w // 2
                if config.factor_out:
                    factored_shapes.append((c // 2, h, w))
                    c = c // 2
                    head_channels.append(c)
                else:
                    head_channels.append(c)
            else:
                if config.fc_end:
                    for _ in range(config.fc_blocks):
                        layers.append(Flatten(self._block(_fc_g(c * h * w, config))))
                        if config.actnorm:
                            layers.append(Flatten(ActNorm(c * h * w)))
                head_channels.append(c)
            scales.append(nn.ModuleList(layers))
        self.scales = nn.ModuleList(scales)
        self.factored_shapes = factored_shapes
        self.final_shape = (c, h, w)
        self.base = StandardNormal()
        if config.task == "classification":
            self.heads = nn.ModuleList(_ClassificationHead(ch, config.classification_hidden) for ch in head_channels)
            self.logits = nn.Linear(config.classification_hidden * len(head_channels), config.n_classes)
        else:
            self.heads = None
            self.logits = None

    def _block(self, g: nn.Module) -> nn.Module:
        cls = MonotoneBlock if self.config.block == "monotone" else ResidualBlock
        solver, adjoint = self.config.solver_options()
        # g is built from spectral-normalised layers only; the block's construction-time check
        # would need the convolutions' power-iteration state, which is created at the first
        # forward (use monoflow.lipschitz.certify_lipschitz after one)
        return cls(g, logdet=_estimator(self.config), solver=solver, adjoint=adjoint, check_lipschitz=False)

    @property
    def dim(self) -> int:
        return self.config.dim

    # -- flow interface -----------------------------------------------------------------------

    def _run_scales(self, x: Tensor, with_logdet: bool, features: Optional[list] = None):
        total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for layer in self.preprocess:
            x, ld = layer(x, with_logdet=with_logdet)
            total = total + ld if ld is not None else total
        outputs = []
        for i, scale in enumerate(self.scales):
            for layer in scale:
                x, ld = layer(x, with_logdet=with_logdet)
                if ld is not None:
                    total = total + ld
            if self.config.factor_out and i < len(self.scales) - 1:
                half = x.shape[1] // 2
                x, f = x[:, :half], x[:, half:]
                outputs.append(f)
                if features is not None:
                    features.append(f)
            elif features is not None:
                features.append(x)
        outputs.append(x)
        z = torch.cat([o.reshape(o.shape[0], -1) for o in outputs], dim=1)
        return z, total

    @reuse_parameter_transforms()  # each g's normalised weights once per pass
    def forward(self, x: Tensor, with_logdet: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        """Latent z (B, D) and :math:`\\log|\\det\\partial z/\\partial x|` for images x in [0, 1]."""
        if tuple(x.shape[1:]) != tuple(self.config.image_shape):
            shape = ", ".join(map(str, self.config.image_shape))
            raise ValueError(f"expected images of shape (B, {shape}), got {tuple(x.shape)}")
        z, total = self._run_scales(x, with_logdet)
        return z, total if with_logdet else None

    @reuse_parameter_transforms()
    def inverse(self, z: Tensor, with_logdet: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        """Images x in [0, 1] from latents z (B, D) and :math:`\\log|\\det\\partial x/\\partial z|`."""
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"expected latents of shape (B, {self.dim}), got {tuple(z.shape)}")
        total = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        pieces, start = [], 0
        for shape in self.factored_shapes + [self.final_shape]:
            n = math.prod(shape)
            pieces.append(z[:, start:start + n].reshape(z.shape[0], *shape))
            start += n
        x = pieces[-1]
        for i in range(len(self.scales) - 1, -1, -1):
            if self.config.factor_out and i < len(self.scales) - 1:
                x = torch.cat([x, pieces[i]], dim=1)
            for layer in reversed(self.scales[i]):
                x, ld = layer.inverse(x, with_logdet=with_logdet)
                if ld is not None:
                    total = total + ld
        for layer in reversed(self.preprocess):
            x, ld = layer.inverse(x, with_logdet=with_logdet)
            if ld is not None:
                total = total + ld
        return x, total if with_logdet else None

    # -- likelihood, sampling, classification ---------------------------------------------------

    def dequantize(self, k: Tensor, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        """Continuous images ``(k + u)/L`` and the dequantisation term ``-D log L - log q(u|k)``."""
        return self.dequantizer(k, generator=generator)

    def log_likelihood_bound(self, k: Tensor, noise: Optional[Tensor] = None,
                             generator: Optional[torch.Generator] = None) -> Tensor:
        r"""One-sample bound of :math:`\log P(k)` in nats, shape (B,), for integer images k.

        ``noise`` (uniform dequantisation only) fixes u in [0,1)^D instead of drawing it.
        """
        if noise is not None:
            if not isinstance(self.dequantizer, UniformDequantization):
                raise ValueError("explicit dequantisation noise is only defined for uniform dequantisation")
            kf = k.to(noise.dtype)
            x = (kf + noise) / self.config.n_levels
            term = torch.full((k.shape[0],), -self.dim * math.log(self.config.n_levels), dtype=x.dtype, device=x.device)
        else:
            x, term = self.dequantize(k, generator)
        z, logdet = self(x)
        return self.base.log_prob(z) + logdet + term

    def bits_per_dim(self, k: Tensor, noise: Optional[Tensor] = None,
                     generator: Optional[torch.Generator] = None) -> Tensor:
        """:math:`-\\log P(k)/(D\\ln 2)` per image (B,). In training mode the log-dets are the
        Neumann-gradient surrogates, so the value is a training surrogate, not a bpd."""
        return -self.log_likelihood_bound(k, noise, generator) / (self.dim * math.log(2.0))

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None, temperature: float = 1.0) -> Tensor:
        """n images in [0, 1] (B, C, H, W) from :math:`z\\sim N(0, T^2 I)`, quantised to the data's levels."""
        p = next(self.parameters())
        z = torch.randn(n, self.dim, generator=generator, dtype=p.dtype, device="cpu").to(p.device) * temperature
        x, _ = self.inverse(z, with_logdet=False)
        levels = torch.clamp(torch.floor(x * self.config.n_levels), 0, self.config.n_levels - 1)
        return levels / (self.config.n_levels - 1)

    def classify(self, x: Tensor) -> Tensor:
        """Class logits (B, n_classes) from images x in [0, 1] (classification variant only)."""
        if self.heads is None:
            raise ValueError("this model was built for density estimation (task='density'); it has no classifier")
        features: list = []
        self._run_scales(x, with_logdet=False, features=features)
        pooled = torch.cat([head(f) for head, f in zip(self.heads, features)], dim=1)
        return self.logits(pooled)


def count_parameters(model: nn.Module) -> int:
    """Number of parameter entries (the count Table 2 reports)."""
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# presets

_DENSITY = ImageTrainingConfig()
_PAPER_TABLE = "Table 2 of the paper"


def _classification_training() -> ImageTrainingConfig:
    return replace(_DENSITY, random_flip=True, random_crop_padding=4, epochs=200)


_IMAGENET_NOTES = (
    "The learnable concatenation trains from epoch 0 (the release's ImageNet setting). "
    "Data: the npz batches of downsampled ImageNet (Chrabaszcz et al. 2017); the paper, "
    "like Glow and Residual Flows, used the earlier 'downsampled ImageNet' of van den "
    "Oord et al. 2016 (PNG archives), whose images were resized differently, so bpd "
    "differs between the two variants (monoflow.data.images reads the npz variant).")


def _table2_presets(cifar: ImageFlowConfig, cifar_train: ImageTrainingConfig, in32: ImageFlowConfig,
                    in_train: ImageTrainingConfig) -> Dict[str, ImagePreset]:
    """The Monotone Flow rows of the paper's Table 2: MNIST, CIFAR-10, ImageNet 32x32 and 64x64."""
    p: Dict[str, ImagePreset] = {}
    p["mnist"] = ImagePreset(
        "mnist", "mnist",
        replace(cifar, image_shape=(1, 28, 28), logit_alpha=1e-6, memory_efficient=False),
        replace(_DENSITY, accumulation_steps=4, warmup_iterations=250),
        "Monotone Flow on MNIST (16-16-16, FC end, batch 64 x 4 accumulation, no memory-efficient mode)",
        paper_bpd=0.928, paper_params=20_872_826,
        notes="Warm-up: the release counts its 1000 warm-up iterations in micro-batches, so with 4 "
              "accumulation steps the learning rate is warm after 250 optimiser steps; ours counts "
              "optimiser steps, hence warmup_iterations=250.",
    )
    p["cifar10"] = ImagePreset(
        "cifar10", "cifar10", cifar, cifar_train,
        "Monotone Flow on CIFAR-10 (16-16-16, FC end, random flips; the paper used 4 GPUs)",
        paper_bpd=3.215, paper_params=24_894_430,
    )
    p["imagenet32"] = ImagePreset(
        "imagenet32", "imagenet32", in32, in_train,
        "Monotone Flow on ImageNet 32x32 (32-32-32, FC end, lr 0.004, batch 256; 8 GPUs in the paper)",
        paper_bpd=3.961, paper_params=46_980_574, notes=_IMAGENET_NOTES,
    )
    p["imagenet64"] = ImagePreset(
        "imagenet64", "imagenet64",
        replace(in32, image_shape=(3, 64, 64), squeeze_first=True, factor_out=True), in_train,
        "Monotone Flow on ImageNet 64x64 (squeeze first, 32-32-32 with factor-out, FC end, lr 0.004, batch 256)",
        paper_bpd=3.734, paper_params=48_907_888, notes=_IMAGENET_NOTES,
    )
    return p


def _ablation_presets(cifar: ImageFlowConfig, cifar_train: ImageTrainingConfig) -> Dict[str, ImagePreset]:
    """The four rows of the CIFAR-10 ablation (block type x activation)."""
    ablation = [
        ("idensenet", 3.25, 24_894_586, "#1 CLipSwish + residual blocks (i-DenseNet)"),
        ("residual-cpila", None, 24_894_430, "#2 CPila + residual blocks"),
        ("monotone-clipswish", None, 24_894_586, "#3 CLipSwish + monotone blocks"),
        ("monotone", 3.215, 24_894_430, "#4 CPila + monotone blocks (Monotone Flow)"),
    ]
    p: Dict[str, ImagePreset] = {}
    for row, (model, bpd, params, text) in enumerate(ablation, start=1):
        p[f"cifar10-ablation-{row}"] = ImagePreset(
            f"cifar10-ablation-{row}", "cifar10", cifar.with_model(model), cifar_train,
            f"CIFAR-10 ablation {text}", paper_bpd=bpd, paper_params=params,
            notes="The slides print no ablation numbers; rows #1 and #4 carry the Table 2 entries "
                  "of i-DenseNet and Monotone Flow.",
        )
    return p


def _vardeq_presets(cifar: ImageFlowConfig, cifar_train: ImageTrainingConfig, in32: ImageFlowConfig,
                    in_train: ImageTrainingConfig) -> Dict[str, ImagePreset]:
    """The Table 2 rows with variational dequantisation: CIFAR-10 and ImageNet 32x32."""
    p: Dict[str, ImagePreset] = {}
    p["cifar10-vardeq"] = ImagePreset(
        "cifar10-vardeq", "cifar10", replace(cifar, dequantization="variational"), cifar_train,
        "Monotone Flow + variational dequantisation on CIFAR-10 (3 conditional residual blocks on the noise)",
        paper_bpd=3.062, paper_params=46_891_648,
    )
    p["imagenet32-vardeq"] = ImagePreset(
        "imagenet32-vardeq", "imagenet32", replace(in32, dequantization="variational"),
        replace(in_train, lr=0.002, batch_size=128, start_learnable_concat_epoch=2),
        "Monotone Flow + variational dequantisation on ImageNet 32x32 (lr 0.002, batch 128, concatenation from epoch 2)",
        paper_bpd=3.901, paper_params=None,
        notes="Training settings follow the release's README for this row (lr 0.002, batch 128, "
              "concatenation from epoch 2). That README also drops the FC end, but then the model has "
              "66,169,512 parameters, not the 69.0M the paper prints; with the FC end it has "
              "68,977,792 (46,980,574 + 3 x 7,332,406), so we keep the FC end and follow the paper's "
              "architecture (--set fc_end=False gives the README's). " + _IMAGENET_NOTES,
    )
    return p


def _classification_presets(cifar: ImageFlowConfig) -> Dict[str, ImagePreset]:
    """CIFAR-10 classification: three sizes x (Monotone Flow, i-DenseNet), cross-entropy only."""
    p: Dict[str, ImagePreset] = {}
    sizes = {"tiny": (1, 1, 1), "small": (4, 4, 4), "large": (16, 16, 16)}
    for size, blocks in sizes.items():
        for model in ("monotone", "idensenet"):
            name = f"cifar10-classify-{size}-{model}"
            p[name] = ImagePreset(
                name, "cifar10",
                replace(cifar, blocks=blocks, growth=80, task="classification", preprocessing="normalize").with_model(model),
                _classification_training(),
                f"CIFAR-10 classification, {size} ({'-'.join(map(str, blocks))} blocks, growth 80), {model}",
                notes="Trained with cross-entropy only (no log-det); the slides give no numbers we can read.",
            )
    return p


def _digits_preset() -> ImagePreset:
    """A CPU-sized run on scikit-learn's 8x8 digits, by epochs (the older CPU preset)."""
    digits_model = ImageFlowConfig(
        image_shape=(1, 8, 8), n_levels=17, blocks=(2, 2), growth=32, depth=3, fc_blocks=2,
    )
    return ImagePreset(
        "digits", "digits", digits_model,
        ImageTrainingConfig(
            batch_size=64, lr=1e-3, warmup_iterations=50, ema_decay=0.98, epochs=15, eval_every=0,
            start_learnable_concat_epoch=5, checkpoint_every=50, log_every=5, eval_batch_size=300,
            n_eval_draws=5,
        ),
        "CPU-sized run: scikit-learn's 8x8 digits (17 levels), 2-2 blocks, growth 32, 2 FC blocks, 15 epochs",
        scale="reduced: digits 8x8 CPU",
    )


def _make_presets() -> Dict[str, ImagePreset]:
    """Every preset, in the order :func:`list_image_presets` gives them: the paper's Table 2 rows,
    the CIFAR-10 ablation, variational dequantisation, classification, then the CPU-sized runs."""
    cifar = ImageFlowConfig()
    cifar_train = replace(_DENSITY, random_flip=True)
    in32 = replace(cifar, blocks=(32, 32, 32))
    in_train = replace(_DENSITY, lr=0.004, batch_size=256, start_learnable_concat_epoch=0)
    p: Dict[str, ImagePreset] = {}
    p.update(_table2_presets(cifar, cifar_train, in32, in_train))
    p.update(_ablation_presets(cifar, cifar_train))
    p.update(_vardeq_presets(cifar, cifar_train, in32, in_train))
    p.update(_classification_presets(cifar))
    p["digits"] = _digits_preset()
    p.update(_cpu_presets())
    return p


#: models trained by the CPU-scale Table 2 (Monotone Flow, i-DenseNet, Residual Flow) and the
#: two mixed rows of the ablation (#2 CPila + residual, #3 CLipSwish + monotone)
CPU_TABLE2_MODELS = ("monotone", "idensenet", "resflow")
CPU_ABLATION_MODELS = ("idensenet", "residual-cpila", "monotone-clipswish", "monotone")


def _cpu_presets() -> Dict[str, ImagePreset]:
    """Table 2 at the scale of a 2-core CPU: real offline data, every model at one parameter budget.

    The architecture is the paper's (dense-net g of depth 3, CPila / CLipSwish, coeff 0.98,
    Poisson roulette with 10 exact terms in training and 20 in evaluation, Neumann gradient,
    ActNorm, FC end) made small: growth 32 instead of 172, 2 blocks per scale instead of 16,
    2 FC blocks instead of 4. MNIST-sized images are squeezed first (28x28x1 -> 14x14x4), so the
    convolutions never run at full resolution. Residual Flow's hidden width is chosen to give the
    same parameter count as the dense-net models (within 0.1%). Runs are a fixed number of steps
    with an EMA of time constant 100 steps; the test bpd is evaluated along the way (one draw on
    ``eval_curve_images`` test images) and at the end (3 draws, the whole test set).
    """
    training = ImageTrainingConfig(
        batch_size=64, lr=1e-3, warmup_iterations=50, ema_decay=0.99, epochs=1, eval_every=50,
        start_learnable_concat_epoch=0, checkpoint_every=25, log_every=5, eval_batch_size=250,
        n_eval_draws=3, eval_curve_images=250,
    )
    mnist5k = ImageFlowConfig(
        image_shape=(1, 28, 28), blocks=(2, 2), squeeze_first=True, growth=32, depth=3, fc_blocks=2,
        logit_alpha=1e-6, resflow_hidden=165,
    )
    digits = ImageFlowConfig(image_shape=(1, 8, 8), n_levels=17, blocks=(2, 2), growth=32, depth=3,
                             fc_blocks=2, resflow_hidden=115)
    scale_note = ("Reduced scale: compare models with each other, not with the paper's MNIST number "
                  "(other data, far smaller model, 2000 steps instead of 1000 epochs).")
    return {
        "mnist5k-cpu": ImagePreset(
            "mnist5k-cpu", "mnist5k", mnist5k, replace(training, iterations=2000, eval_every=100),
            "CPU-scale Table 2 row on 5,000 real MNIST digits (28x28, 256 levels; 4,000 train / 1,000 "
            "test): squeeze first, 2-2 blocks, growth 32, 2 FC blocks, batch 64, 2000 steps",
            scale="reduced: mnist5k 28x28 CPU", notes=scale_note,
        ),
        "digits-cpu": ImagePreset(
            "digits-cpu", "digits", digits, replace(training, iterations=1500, eval_every=100, eval_curve_images=300),
            "CPU-scale Table 2 row on scikit-learn's 8x8 digits (17 levels; 1,500 train / 297 test): "
            "2-2 blocks, growth 32, 2 FC blocks, batch 64, 1500 steps",
            scale="reduced: digits 8x8 CPU", notes="No paper number: 8x8 images with 17 levels.",
        ),
    }


_PRESETS = _make_presets()


def list_image_presets() -> List[str]:
    """Names of all image presets."""
    return list(_PRESETS)


def get_image_preset(name: Union[str, ImagePreset]) -> ImagePreset:
    """The preset called ``name`` (a preset is returned as is)."""
    if isinstance(name, ImagePreset):
        return name
    if name not in _PRESETS:
        raise ValueError(f"unknown image preset {name!r}; expected one of {list_image_presets()}")
    return _PRESETS[name]


def image_flow(preset: Union[str, ImagePreset, ImageFlowConfig], model: Optional[str] = None, **overrides) -> ImageFlow:
    """Build the model of a preset (by name), a preset or a config.

    ``model`` swaps the block/activation pair (``"monotone"``, ``"idensenet"``, ...); other
    keyword arguments replace config fields, e.g. ``image_flow("cifar10", blocks=(1, 1, 1))``.

    >>> count_parameters(image_flow("digits")) > 0
    True
    """
    config = preset if isinstance(preset, ImageFlowConfig) else get_image_preset(preset).model
    if model is not None:
        config = config.with_model(model)
    if overrides:
        unknown = set(overrides) - set(ImageFlowConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown ImageFlowConfig fields {sorted(unknown)}")
        config = replace(config, **overrides)
    return ImageFlow(config)
