"""Image data loaders on tiny files written here in each on-disk format."""
import pickle

import numpy as np
import pytest
import torch

from monoflow.data.images import (
    IMAGE_DATASETS, iterate_batches, load_cifar10, load_digits, load_downsampled_imagenet, load_image_dataset,
    load_mnist, write_idx,
)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_round_trip(tmp_path, rng, compress):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7, dtype=np.uint8)
    suffix = ".gz" if compress else ""
    write_idx(raw / f"t10k-images-idx3-ubyte{suffix}", images, compress=compress)
    write_idx(raw / f"t10k-labels-idx1-ubyte{suffix}", labels, compress=compress)
    data = load_mnist(tmp_path, train=False)
    assert data.images.shape == (7, 1, 28, 28) and data.n_levels == 256
    np.testing.assert_array_equal(np.asarray(data.images)[:, 0], images)
    np.testing.assert_array_equal(np.asarray(data.labels), labels)
    if not compress:
        assert isinstance(data.images.base, np.memmap) or isinstance(data.images, np.memmap)
    # the header is parsed, not assumed: a hand-made header with different sizes must agree
    with open(raw / "t10k-images-idx3-ubyte", "rb") as f:
        head = f.read(16)
    assert head[:4] == b"\x00\x00\x08\x03" and int.from_bytes(head[4:8], "big") == 7
    k, y = data.batch([3, 0, 5])
    assert k.dtype == torch.uint8 and k.shape == (3, 1, 28, 28)
    np.testing.assert_array_equal(k[:, 0].numpy(), images[[3, 0, 5]])
    np.testing.assert_array_equal(y.numpy(), labels[[3, 0, 5]])


def test_mnist_bad_magic(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04" + bytes(20))
    (raw / "train-labels-idx1-ubyte").write_bytes(b"\x01\x02\x03\x04" + bytes(20))
    with pytest.raises(ValueError, match="not an idx file"):
        load_mnist(tmp_path, train=True)


def test_cifar10_pickles(tmp_path, rng):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
        labels = list(rng.integers(0, 10, size=4))
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
        batches.append((data, labels))
    train = load_cifar10(tmp_path, train=True)
    assert train.images.shape == (20, 3, 32, 32)
    expected = np.concatenate([b[0] for b in batches[:5]]).reshape(-1, 3, 32, 32)
    np.testing.assert_array_equal(np.asarray(train.images), expected)
    # channel-major layout: the first 1024 values of a row are the red plane
    np.testing.assert_array_equal(np.asarray(train.images[0, 0]).ravel(), batches[0][0][0, :1024])
    test = load_cifar10(tmp_path, train=False)
    np.testing.assert_array_equal(np.asarray(test.labels), batches[5][1])
    # converted once to .npy and memory-mapped afterwards
    assert (folder / "monoflow_train_images.npy").exists()
    again = load_cifar10(tmp_path, train=True)
    assert isinstance(again.images, np.memmap)
    np.testing.assert_array_equal(np.asarray(again.images), expected)


@pytest.mark.parametrize("size", [32, 64])
def test_downsampled_imagenet_npz(tmp_path, rng, size):
    folder = tmp_path / f"imagenet{size}"
    folder.mkdir()
    parts = []
    for i in (1, 2, 10):  # numeric order, not lexicographic
        data = rng.integers(0, 256, size=(3, 3 * size * size), dtype=np.uint8)
        labels = rng.integers(1, 1001, size=3)
        np.savez(folder / f"train_data_batch_{i}.npz", data=data, labels=labels)
        parts.append((data, labels))
    val = rng.integers(0, 256, size=(2, 3 * size * size), dtype=np.uint8)
    np.savez(folder / "val_data.npz", data=val, labels=np.array([1, 1000]))
    train = load_downsampled_imagenet(tmp_path, size, train=True)
    assert train.images.shape == (9, 3, size, size)
    np.testing.assert_array_equal(np.asarray(train.images).reshape(9, -1), np.concatenate([p[0] for p in parts]))
    np.testing.assert_array_equal(np.asarray(train.labels), np.concatenate([p[1] for p in parts]) - 1)
    test = load_image_dataset(f"imagenet{size}", tmp_path, train=False)
    np.testing.assert_array_equal(np.asarray(test.labels), [0, 999])
    assert test.shape == IMAGE_DATASETS[f"imagenet{size}"][:3]


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_dataset("cifar10", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        load_image_dataset("cifar10", tmp_path)
    with pytest.raises(FileNotFoundError, match="MNIST/raw"):
        load_image_dataset("mnist", tmp_path)
    with pytest.raises(FileNotFoundError, match="train_data_batch_1"):
        load_image_dataset("imagenet32", tmp_path)
    with pytest.raises(ValueError, match="needs a data folder"):
        load_image_dataset("mnist", None)
    with pytest.raises(ValueError, match="unknown image data set"):
        load_image_dataset("svhn", tmp_path)


def test_digits_split():
    train, test = load_digits(True), load_digits(False)
    assert len(train) == 1500 and len(test) == 297 and train.n_levels == 17
    assert int(np.asarray(train.images).max()) == 16
    assert train.shape == (1, 8, 8)
    assert load_digits(True).images.tobytes() == train.images.tobytes()  # fixed split


def test_batches_partition_the_global_batch():
    single = list(iterate_batches(50, 8, seed=3, epoch=2))
    assert len(single) == 6 and all(len(b) == 8 for b in single)
    assert len(set(np.concatenate(single))) == 48
    ranks = [list(iterate_batches(50, 8, seed=3, epoch=2, rank=r, world_size=2)) for r in range(2)]
    for b, batch in enumerate(single):
        np.testing.assert_array_equal(np.concatenate([ranks[0][b], ranks[1][b]]), batch)
    assert not np.array_equal(single[0], next(iterate_batches(50, 8, seed=3, epoch=3)))
    resumed = list(iterate_batches(50, 8, seed=3, epoch=2, start=4))
    np.testing.assert_array_equal(resumed[0], single[4])
    with pytest.raises(ValueError, match="divisible"):
        next(iterate_batches(50, 9, seed=0, epoch=0, world_size=2))
