"""torchvision's real CIFAR and ImageFolder loaders on small files written here in the datasets' on-disk formats."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from atofx.app import datasets
from atofx.app.datasets import DatasetError, ImageData, load_images, loaders
from atofx.ato import distributed

PER_BATCH = 20
CLASSES = ("red", "green", "blue")


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes bytes as Python 2 `str` (SHORT_BINSTRING/BINSTRING), as the CIFAR files were written: torchvision
    reads them with encoding="latin1", which turns keys like b'data' into 'data'."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_py2_str(self, obj: bytes) -> None:
        head = pickle.SHORT_BINSTRING + bytes([len(obj)]) if len(obj) < 256 else pickle.BINSTRING + struct.pack(
            "<i", len(obj))
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def _dump_py2(obj: object, path: Path) -> str:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue())
    return hashlib.md5(buf.getvalue()).hexdigest()


def cifar_images(n: int, seed: int, classes: int) -> tuple[np.ndarray, list[int]]:
    """(n, 3072) uint8 rows (R plane, G plane, B plane of 32x32) and labels."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), [int(v) for v in rng.integers(0, classes, n)]


def write_cifar10(root: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[np.ndarray, list[int]]]:
    """cifar-10-batches-py/ with data_batch_1..5 and test_batch of PER_BATCH images each, and batches.meta.

    torchvision checks each file's MD5 against the real dataset's; the expected sums are set to these files'."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written, sums = {}, {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data, labels = cifar_images(PER_BATCH, i, 10)
        sums[name] = _dump_py2({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                                b"filenames": [f"{name}_{k}.png".encode() for k in range(PER_BATCH)]}, folder / name)
        written[name] = (data, labels)
    meta_md5 = _dump_py2({b"label_names": [f"class{k}".encode() for k in range(10)], b"num_cases_per_batch": PER_BATCH,
                          b"num_vis": 3072}, folder / "batches.meta")
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[f"data_batch_{k}", sums[f"data_batch_{k}"]] for k in range(1, 6)])
    monkeypatch.setattr(cls, "test_list", [["test_batch", sums["test_batch"]]])
    monkeypatch.setattr(cls, "meta", {"filename": "batches.meta", "key": "label_names", "md5": meta_md5})
    return written


def write_cifar100(root: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[np.ndarray, list[int]]]:
    """cifar-100-python/ with train (2 * PER_BATCH images), test (PER_BATCH) and meta, fine and coarse labels."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    written, sums = {}, {}
    for i, (name, n) in enumerate((("train", 2 * PER_BATCH), ("test", PER_BATCH))):
        data, labels = cifar_images(n, 10 + i, 100)
        sums[name] = _dump_py2({b"filenames": [b"x.png"] * n, b"batch_label": name.encode(), b"fine_labels": labels,
                                b"coarse_labels": [v // 5 for v in labels], b"data": data}, folder / name)
        written[name] = (data, labels)
    meta_md5 = _dump_py2({b"fine_label_names": [f"fine{k}".encode() for k in range(100)],
                          b"coarse_label_names": [f"coarse{k}".encode() for k in range(20)]}, folder / "meta")
    cls = torchvision.datasets.CIFAR100
    monkeypatch.setattr(cls, "train_list", [["train", sums["train"]]])
    monkeypatch.setattr(cls, "test_list", [["test", sums["test"]]])
    monkeypatch.setattr(cls, "meta", {"filename": "meta", "key": "fine_label_names", "md5": meta_md5})
    return written


def write_image_folder(root: Path, train: int = 4, val: int = 2, size: int = 40, classes=CLASSES) -> Path:
    """root/train/<class>/*.png and root/val/<class>/*.png; class k's images are bright in channel k."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for k, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                img[..., k % 3] += 150
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def _normalised(row: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(row.reshape(3, 32, 32).astype(np.float32) / 255.0)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


# --------------------------------------------------------------------------------------------- CIFAR
def test_cifar10_reads_the_python_batches(tmp_path, monkeypatch):
    written = write_cifar10(tmp_path, monkeypatch)
    data = load_images("cifar10", tmp_path, size=32)
    assert (len(data.train), len(data.val), data.classes, data.channels, data.size) == (5 * PER_BATCH, PER_BATCH, 10, 3, 32)
    test_data, test_labels = written["test_batch"]
    x, y = data.val[3]  # validation only normalises: the exact stored pixels come back
    assert y == test_labels[3]
    torch.testing.assert_close(x, _normalised(test_data[3], datasets.CIFAR_MEAN, datasets.CIFAR_STD))
    train_data, train_labels = written["data_batch_2"]
    x, y = data.train[PER_BATCH + 5]  # batches are concatenated in order
    assert y == train_labels[5] and x.shape == (3, 32, 32)
    torch.manual_seed(0)
    crops = {tuple(data.train[0][0].flatten()[:50].tolist()) for _ in range(6)}
    assert len(crops) > 1, "training images are randomly cropped and flipped"


def test_cifar100_reads_fine_labels(tmp_path, monkeypatch):
    written = write_cifar100(tmp_path, monkeypatch)
    data = load_images("cifar100", str(tmp_path), size=32)
    assert (len(data.train), len(data.val), data.classes) == (2 * PER_BATCH, PER_BATCH, 100)
    test_data, test_labels = written["test"]
    x, y = data.val[7]
    assert y == test_labels[7]
    torch.testing.assert_close(x, _normalised(test_data[7], datasets.CIFAR100_MEAN, datasets.CIFAR100_STD))
    train, val = loaders(data, batch_size=16, seed=0, num_workers=0)
    xb, yb = next(iter(train))
    assert xb.shape == (16, 3, 32, 32) and yb.dtype == torch.int64 and int(yb.max()) < 100
    assert sum(len(b[1]) for b in val) == PER_BATCH


def test_cifar_missing_files_say_what_to_do(tmp_path):
    with pytest.raises(DatasetError, match=r"cifar10 was not found .*cifar-10-batches-py.*add --download") as exc:
        load_images("cifar10", tmp_path, size=32)
    assert "download=True" not in str(exc.value)  # torchvision's advice in Python words
    with pytest.raises(DatasetError, match=r"does not exist; create it .* or add --download"):
        load_images("cifar100", tmp_path / "nowhere", size=32)
    with pytest.raises(DatasetError, match=r"needs --data-dir DIR"):
        load_images("cifar10", None, size=32)


def test_cifar_download_without_network_is_an_atofx_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    with pytest.raises(DatasetError, match=r"could not download cifar10 .*URLError.*run again without --download"):
        load_images("cifar10", tmp_path / "new", size=32, download=True)
    assert (tmp_path / "new").is_dir()  # --download creates the folder it fills


# --------------------------------------------------------------------------------------- ImageFolder
def test_folder_reads_class_folders_at_the_model_resolution(tmp_path):
    write_image_folder(tmp_path)
    data = load_images("folder", tmp_path, size=32)
    assert (len(data.train), len(data.val), data.classes, data.size) == (12, 6, 3, 32)
    assert data.example_shape == (1, 3, 32, 32)
    assert data.train.classes == sorted(CLASSES)  # type: ignore[attr-defined]
    x, y = data.val[0]
    assert x.shape == (3, 32, 32) and y == 0
    torch.testing.assert_close(data.val[0][0], x)  # Resize + CenterCrop: deterministic
    big = load_images("folder", tmp_path, size=64)
    assert big.train[0][0].shape == (3, 64, 64) and big.val[0][0].shape == (3, 64, 64)


def test_loaders_with_workers_are_seeded(tmp_path):
    write_image_folder(tmp_path)
    data = load_images("folder", tmp_path, size=32)

    def order(seed: int) -> list[int]:
        train, _ = loaders(data, batch_size=5, seed=seed, num_workers=2)
        assert train.num_workers == 2 and not train.persistent_workers  # fresh workers: exact resume
        return [int(v) for _, y in train for v in y]

    first = order(0)
    assert sorted(first) == sorted(y for _, y in data.train.samples)  # type: ignore[attr-defined]
    assert order(0) == first


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs os.sched_getaffinity")
@pytest.mark.parametrize(("cpus", "world", "workers"), [(8, 1, 4), (2, 1, 2), (2, 2, 1), (1, 2, 0)])
def test_loader_workers_share_the_cpus_with_the_other_ranks(monkeypatch, cpus, world, workers):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    monkeypatch.setattr(distributed, "current", lambda: distributed.Ranks(0, world, 0))
    assert datasets.default_workers() == workers


def test_imagenet_layout_is_class_folders(tmp_path):
    write_image_folder(tmp_path, train=2, val=1)
    data = load_images("imagenet", tmp_path, size=48)
    assert isinstance(data, ImageData) and data.classes == 3 and data.val[0][0].shape == (3, 48, 48)


@pytest.mark.parametrize(
    ("setup", "name", "message"),
    [
        (lambda r: None, "folder", r"folder 'nowhere' is missing|does not exist"),
        (lambda r: write_image_folder(r, classes=("a", "b")) and (r / "val" / "b").rename(r / "val" / "c"), "folder",
         r"same class folders; only in train/: \['b'\], only in val/: \['c'\]"),
        (lambda r: (r / "train" / "a").mkdir(parents=True) or (r / "val" / "a").mkdir(parents=True), "folder",
         r"one subfolder of images per class"),
        (lambda r: write_image_folder(r) and __import__("shutil").rmtree(r / "val"), "folder",
         r"folder: folder '.*val' is missing"),
        (lambda r: (r / "train").mkdir(), "imagenet", r"neither train/ and val/ class folders nor the archives"),
    ],
)
def test_folder_errors_say_what_to_do(tmp_path, setup, name, message):
    root = tmp_path / "data"
    root.mkdir()
    setup(root)
    target = tmp_path / "nowhere" if message.startswith("folder 'nowhere'") else root
    with pytest.raises(DatasetError, match=message):
        load_images(name, target, size=32)


def test_download_is_for_cifar_only(tmp_path):
    write_image_folder(tmp_path)
    with pytest.raises(DatasetError, match="--download works for cifar10 and cifar100 only"):
        load_images("folder", tmp_path, size=32, download=True)


# ----------------------------------------------------------------------------------- Fashion-MNIST
def _idx_bytes(array: np.ndarray) -> bytes:
    """The IDX format of unsigned bytes: 0, 0, 0x08, ndim, the dims as big-endian int32, then the data."""
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()


def write_fashion_mnist(root: Path, train: int = 30, test: int = 10, compress: bool = True,
                        seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The four Fashion-MNIST files (gzip-compressed as Debian ships them, or plain) with random images."""
    import gzip

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for prefix, n in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for stem, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            data = _idx_bytes(array)
            if compress:
                (root / f"{stem}.gz").write_bytes(gzip.compress(data))
            else:
                (root / stem).write_bytes(data)
        written[prefix] = (images, labels)
    return written


def _fashion_normalised(image: np.ndarray) -> torch.Tensor:
    """A 28x28 uint8 image as Fashion-MNIST's unaugmented splits give it (the channel dim left out)."""
    return (torch.from_numpy(image).float() / 255 - datasets.FASHION_MNIST_MEAN[0]) / datasets.FASHION_MNIST_STD[0]


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_reads_the_idx_files_in_place(tmp_path, compress):
    written = write_fashion_mnist(tmp_path, compress=compress)
    data = load_images("fashion-mnist", tmp_path, 28)
    assert isinstance(data.train, torchvision.datasets.FashionMNIST)
    assert (len(data.train), len(data.val), data.classes, data.channels, data.size) == (30, 10, 10, 1, 28)
    images, labels = written["t10k"]
    x, y = data.val[3]  # no augmentation on the test split: exactly the normalised pixels
    expected = _fashion_normalised(images[3])
    assert x.shape == (1, 28, 28) and y == int(labels[3])
    assert torch.allclose(x[0], expected, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(  # read where they are: nothing written
        f"{s}{'.gz' if compress else ''}" for s in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                                    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))


def test_fashion_mnist_training_split_is_augmented(tmp_path):
    written = write_fashion_mnist(tmp_path)
    data = load_images("fashion-mnist", tmp_path, 28)
    torch.manual_seed(0)
    draws = [data.train[0][0] for _ in range(6)]  # random crop with padding 2 and flips: not all the same
    assert all(d.shape == (1, 28, 28) for d in draws)
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    plain = data.unaugmented_train()  # the validation split carved from training images: never augmented
    expected = _fashion_normalised(written["train"][0][4])
    assert torch.allclose(plain[4][0][0], expected, atol=1e-6) and plain[4][1] == int(written["train"][1][4])
    assert any(not torch.equal(data.train[4][0], plain[4][0]) for _ in range(4))
    assert plain.data is data.train.data  # the same tensors: the files are not read again
    rebuilt = pickle.loads(pickle.dumps(plain))  # what a loader worker gets: still not augmented
    assert all(torch.equal(rebuilt[4][0], plain[4][0]) for _ in range(3))


def test_fashion_mnist_batches_are_fetched_whole_and_match_single_images(tmp_path):
    write_fashion_mnist(tmp_path)
    data = load_images("fashion-mnist", tmp_path, 28)
    val = torch.utils.data.Subset(data.val, [7, 2, 5])
    x, y = next(iter(torch.utils.data.DataLoader(val, batch_size=3)))  # through __getitems__
    assert x.shape == (3, 1, 28, 28) and y.dtype == torch.int64
    for k, i in enumerate([7, 2, 5]):
        assert torch.equal(x[k], data.val[i][0]) and y[k] == data.val[i][1]


def test_cifar_unaugmented_train_only_normalises(tmp_path, monkeypatch):
    written = write_cifar10(tmp_path, monkeypatch)
    data = load_images("cifar10", tmp_path, size=32)
    x, y = data.unaugmented_train()[PER_BATCH + 5]
    train_data, train_labels = written["data_batch_2"]
    assert y == train_labels[5]
    torch.testing.assert_close(x, _normalised(train_data[5], datasets.CIFAR_MEAN, datasets.CIFAR_STD))


def test_fashion_mnist_survives_pickling_for_loader_workers(tmp_path):
    write_fashion_mnist(tmp_path)
    data = load_images("fashion-mnist", tmp_path, 28)
    again = pickle.loads(pickle.dumps(data.val))
    assert torch.equal(again[2][0], data.val[2][0])
    train, val = loaders(data, batch_size=8, num_workers=1)
    x, y = next(iter(val))
    assert x.shape == (8, 1, 28, 28) and y.dtype == torch.int64


def test_fashion_mnist_missing_or_damaged_says_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match=r"does not exist.*apt-get install dataset-fashion-mnist.*--data-dir"):
        load_images("fashion-mnist", tmp_path / "nowhere", 28)
    write_fashion_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte\(.gz\) is missing.*apt-get install"):
        load_images("fashion-mnist", tmp_path, 28)
    write_fashion_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DatasetError, match=r"is damaged.*--reinstall dataset-fashion-mnist"):
        load_images("fashion-mnist", tmp_path, 28)
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path / "not-installed")
    with pytest.raises(DatasetError, match="not-installed"):  # no --data-dir: the Debian package's folder
        load_images("fashion-mnist", None, 28)


def test_fashion_mnist_mismatched_files_are_refused(tmp_path):
    write_fashion_mnist(tmp_path)
    other = write_fashion_mnist(tmp_path / "other", train=31)
    assert len(other["train"][0]) == 31
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes((tmp_path / "other/train-labels-idx1-ubyte.gz").read_bytes())
    with pytest.raises(DatasetError, match="do not match"):
        load_images("fashion-mnist", tmp_path, 28)


@pytest.mark.skipif(not datasets.FASHION_MNIST_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_the_installed_fashion_mnist_is_complete():
    data = load_images("fashion-mnist", None, 28)
    assert (len(data.train), len(data.val)) == (60_000, 10_000)
    assert sorted(int(c) for c in data.val.targets.bincount()) == [1000] * 10
