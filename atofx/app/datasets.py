"""Data recipes: `digits` (scikit-learn's bundled 8x8 digits, no download), `fashion-mnist` (the original
files as Debian's `dataset-fashion-mnist` installs them, read by torchvision's FashionMNIST) and the
paper's datasets through torchvision: `cifar10`, `cifar100`, `imagenet` and `folder` (any ImageFolder
tree with `train/` and `val/`)."""

from __future__ import annotations

import copy
import gzip
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from atofx.app.batch_augmentation import crop_and_flip
from atofx.app.options import DATASETS
from atofx.ato import distributed
from atofx.errors import AtofxError, DatasetError

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)  # over the 60,000 training images
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # where `apt-get install dataset-fashion-mnist` puts it


@runtime_checkable
class BatchAugmented(Protocol):
    """A training set that augments whole batches itself (no per-image `transform` to swap)."""

    def without_augmentation(self) -> Dataset: ...


@dataclass
class ImageData:
    """Training and validation sets of one recipe, with what the model needs to know about them."""

    train: Dataset
    val: Dataset
    classes: int
    channels: int
    size: int  # height = width of the images the model sees

    @property
    def example_shape(self) -> tuple[int, int, int, int]:
        return (1, self.channels, self.size, self.size)

    def unaugmented_train(self) -> Dataset:
        """The training images as `val` presents them (normalised, not augmented): for a validation split
        carved from the training set."""
        if isinstance(self.train, BatchAugmented):  # fashion-mnist
            return self.train.without_augmentation()
        plain = copy.copy(self.train)
        plain.transform = self.val.transform  # type: ignore[attr-defined]  # torchvision's per-image transforms
        return plain


def digits(seed: int = 0, val_share: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """1797 grey 8x8 images of 10 digits as (1, 8, 8) float tensors, split stratified into train/val."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images.astype(np.float32) / 16.0 - 0.5) / 0.5
    y = data.target.astype(np.int64)
    x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=val_share, random_state=seed, stratify=y)
    as_ds = lambda a, b: TensorDataset(torch.from_numpy(a[:, None]), torch.from_numpy(b))  # noqa: E731
    return as_ds(x_tr, y_tr), as_ds(x_va, y_va)


def digits_loaders(batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    train, val = digits(seed)
    if distributed.current().parallel:
        return (DataLoader(train, batch_size=batch_size, sampler=distributed.training_sampler(train, seed)),
                DataLoader(val, batch_size=256, sampler=distributed.ShardSampler(val, distributed.current())))
    gen = torch.Generator().manual_seed(seed)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen),
            DataLoader(val, batch_size=256))


# ----------------------------------------------------------------------------------- transforms
def cifar_transforms(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[Any, Any]:
    """The standard CIFAR augmentation: RandomCrop(32, padding=4) + horizontal flip; val only normalises."""
    from torchvision import transforms as T

    norm = [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *norm]), T.Compose(norm)


def imagenet_transforms(size: int = 224) -> tuple[Any, Any]:
    """RandomResizedCrop(size) + flip for training; Resize(size * 256/224) + CenterCrop(size) for validation."""
    from torchvision import transforms as T

    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *norm])
    val = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), *norm])
    return train, val


# ----------------------------------------------------------------------------------- datasets
def _data_root(name: str, data_dir: str | os.PathLike | None, download: bool) -> Path:
    if data_dir is None:
        raise DatasetError(f"dataset {name!r} needs --data-dir DIR: the folder that holds it"
                           + (" (or where --download should put it)." if name.startswith("cifar") else "."))
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        if download and name.startswith("cifar"):
            root.mkdir(parents=True, exist_ok=True)
        else:
            what = ("train/<class>/ and val/<class>/ image folders" if name in ("folder", "imagenet")
                    else f"{name}'s files")
            hint = " or add --download to fetch it there" if name.startswith("cifar") else ""
            raise DatasetError(f"data folder {str(root)!r} does not exist; create it and put {what} in it{hint}.")
    return root


def cifar(name: str, data_dir: str | os.PathLike | None, download: bool = False) -> ImageData:
    """CIFAR-10 or CIFAR-100 from torchvision's on-disk format (cifar-10-batches-py/, cifar-100-python/)."""
    from torchvision import datasets

    root = _data_root(name, data_dir, download)
    cls, classes = (datasets.CIFAR10, 10) if name == "cifar10" else (datasets.CIFAR100, 100)
    mean, std = (CIFAR_MEAN, CIFAR_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    train_tf, val_tf = cifar_transforms(mean, std)
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    try:
        train = cls(str(root), train=True, transform=train_tf, download=download)
        val = cls(str(root), train=False, transform=val_tf, download=download)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise DatasetError(
            f"{name} was not found (or is damaged) in {str(root / folder)!r}: {_without_python_advice(exc)} Unpack "
            f"the python version of {name} there (https://www.cs.toronto.edu/~kriz/cifar.html) or add --download.") from exc
    except (OSError, ValueError) as exc:  # no network, refused connection, bad archive
        raise DatasetError(
            f"could not download {name} into {str(root)!r} ({type(exc).__name__}: {exc}). Fetch the python "
            f"version by hand from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it there, then run "
            f"again without --download.") from exc
    return ImageData(train, val, classes, 3, 32)


def _without_python_advice(exc: Exception) -> str:
    """torchvision's message without its advice in Python words (`download=True`): the CLI says --download."""
    text = re.sub(r"\s*You can use download=True to download it\.?", "", str(exc)).strip()
    return text if text.endswith(".") else text + "."


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file (the MNIST family's format), gzip-compressed or plain, as a uint8 tensor of its dims."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
            raise ValueError("not an IDX file of unsigned bytes")
        ndim = raw[3]
        dims = [int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)]
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        if data.size != int(np.prod(dims)):
            raise ValueError(f"{data.size} bytes of data for dims {dims}")
    except (OSError, EOFError, ValueError) as exc:  # gzip.BadGzipFile is an OSError
        raise DatasetError(f"fashion-mnist: {str(path)!r} is damaged ({exc}); reinstall it with `apt-get install "
                           "--reinstall dataset-fashion-mnist` or point --data-dir at a good copy.") from exc
    return torch.from_numpy(data.reshape(dims).copy())


def _idx_file(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise DatasetError(
        f"fashion-mnist: {stem}(.gz) is missing from {str(root)!r}. Install the dataset with "
        f"`apt-get install dataset-fashion-mnist` (it goes to {FASHION_MNIST_DIR}) or pass --data-dir DIR, "
        "a folder holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz "
        "and t10k-labels-idx1-ubyte.gz.")


def fashion_mnist_split(root: Path, train: bool, augment: bool) -> Dataset:
    """One split of Fashion-MNIST from the four IDX files in `root` (read in place: no copy, no download),
    normalised; with `augment`, randomly cropped from the image padded by 2 and flipped (a mirrored shirt or
    shoe is still one), a batch at a time (`batch_augmentation`: ~2 ms a batch of 128 where torchvision's
    per-image transforms take ~45)."""
    from torchvision import datasets

    class _Files(datasets.FashionMNIST):
        """torchvision's FashionMNIST over a plain folder of IDX files, gzip-compressed or not."""

        def __init__(self) -> None:
            prefix = "train" if train else "t10k"
            self.files = (_idx_file(root, f"{prefix}-images-idx3-ubyte"), _idx_file(root, f"{prefix}-labels-idx1-ubyte"))
            self.augment = augment
            super().__init__(str(root), train=train)

        def _check_exists(self) -> bool:
            return True  # __init__ found both files

        def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:  # a local class: loader workers rebuild it by name
            return fashion_mnist_split, (root, train, self.augment)

        def _load_data(self) -> tuple[torch.Tensor, torch.Tensor]:
            images, labels = (read_idx(f) for f in self.files)
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise DatasetError(f"fashion-mnist: {self.files[0].name} and {self.files[1].name} in {str(root)!r} "
                                   f"do not match (images {tuple(images.shape)}, labels {tuple(labels.shape)}).")
            return images, labels.long()

        def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
            return self.__getitems__([index])[0]

        def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
            """A batch of (image, label) pairs: what a DataLoader fetches in one call."""
            images = self.data[indices].unsqueeze(1)
            if self.augment:
                images = crop_and_flip(images, padding=2)
            x = (images.float() / 255 - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]
            return list(zip(x.unbind(0), self.targets[indices].tolist(), strict=True))

        def without_augmentation(self) -> Dataset:
            """The same images and tensors, not augmented (the files are not read again)."""
            plain = object.__new__(type(self))  # not copy.copy: it would go through __reduce__, re-reading them
            plain.__dict__.update(self.__dict__, augment=False)
            return plain

    return _Files()


def fashion_mnist(data_dir: str | os.PathLike | None = None) -> ImageData:
    """Fashion-MNIST's 60,000 training and 10,000 test images (28x28 grey, 10 classes); the test set is `val`."""
    root = FASHION_MNIST_DIR if data_dir is None else Path(data_dir).expanduser()
    if not root.is_dir():
        raise DatasetError(
            f"fashion-mnist: folder {str(root)!r} does not exist. Install the dataset with "
            f"`apt-get install dataset-fashion-mnist` (it goes to {FASHION_MNIST_DIR}) or pass --data-dir DIR.")
    return ImageData(fashion_mnist_split(root, True, augment=True), fashion_mnist_split(root, False, augment=False),
                     10, 1, 28)


def _image_folder(path: Path, transform: Any, what: str) -> Dataset:
    from torchvision import datasets

    if not path.is_dir():
        raise DatasetError(f"{what}: folder {str(path)!r} is missing; it must hold one subfolder of images per class.")
    try:
        return datasets.ImageFolder(str(path), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:  # no class folder, or class folders without images
        raise DatasetError(f"{what}: {exc} Put one subfolder of images per class in {str(path)!r}.") from exc


def folder(data_dir: str | os.PathLike | None, size: int = 224, name: str = "folder") -> ImageData:
    """ImageFolder trees DATA_DIR/train/<class>/*.png and DATA_DIR/val/<class>/*.png, the ImageNet pipeline at `size`."""
    root = _data_root(name, data_dir, False)
    train_tf, val_tf = imagenet_transforms(size)
    train = _image_folder(root / "train", train_tf, name)
    val = _image_folder(root / "val", val_tf, name)
    if train.classes != val.classes:  # type: ignore[attr-defined]
        only_train = sorted(set(train.classes) - set(val.classes))  # type: ignore[attr-defined]
        only_val = sorted(set(val.classes) - set(train.classes))  # type: ignore[attr-defined]
        raise DatasetError(f"{name}: train/ and val/ must hold the same class folders; only in train/: "
                           f"{only_train or '-'}, only in val/: {only_val or '-'}.")
    return ImageData(train, val, len(train.classes), 3, size)  # type: ignore[attr-defined]


def imagenet(data_dir: str | os.PathLike | None, size: int = 224) -> ImageData:
    """ImageNet as DATA_DIR/train and DATA_DIR/val class folders, or from its archives (torchvision.datasets.ImageNet)."""
    root = _data_root("imagenet", data_dir, False)
    if (root / "train").is_dir() and (root / "val").is_dir():
        return folder(root, size, "imagenet")
    archives = ("ILSVRC2012_devkit_t12.tar.gz", "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
    if all((root / a).is_file() for a in archives):
        from torchvision import datasets

        train_tf, val_tf = imagenet_transforms(size)
        train = datasets.ImageNet(str(root), split="train", transform=train_tf)  # unpacks the archives once
        val = datasets.ImageNet(str(root), split="val", transform=val_tf)
        return ImageData(train, val, len(train.classes), 3, size)
    raise DatasetError(
        f"imagenet: {str(root)!r} holds neither train/ and val/ class folders nor the archives {', '.join(archives)}; "
        "put either there (val/ must be sorted into class folders too).")


def load_images(name: str, data_dir: str | os.PathLike | None, size: int, download: bool = False) -> ImageData:
    """The datasets and facts of recipe `name` (any of DATASETS but digits); `size` matters for folder and imagenet."""
    if name in ("cifar10", "cifar100"):
        return cifar(name, data_dir, download)
    if download:
        raise DatasetError(f"--download works for cifar10 and cifar100 only; fetch {name} yourself and drop it.")
    if name == "fashion-mnist":
        return fashion_mnist(data_dir)
    if name == "imagenet":
        return imagenet(data_dir, size)
    if name == "folder":
        return folder(data_dir, size)
    raise AtofxError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}.")


def default_workers() -> int:
    """Loader processes per rank: up to 4, sharing the CPUs this process may use with the other ranks."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(4, cpus // distributed.current().world)


def loaders(data: ImageData, batch_size: int, seed: int = 0, num_workers: int | None = None,
            pin_memory: bool = False) -> tuple[DataLoader, DataLoader]:
    """Shuffled training loader (its own seeded generator, so runs resume exactly) and validation loader.

    Under torchrun each rank loads its shard: a DistributedSampler for training, every world-th image
    for validation.
    """
    workers = default_workers() if num_workers is None else num_workers
    if workers < 0:
        raise AtofxError(f"num_workers must be >= 0, got {workers}.")
    common: dict[str, Any] = {"num_workers": workers, "pin_memory": pin_memory}
    # training workers start afresh each epoch, seeded from the loader's (checkpointed) random state, so a
    # resumed run augments exactly as an uninterrupted one; validation has no randomness and keeps its workers
    val_workers = {"persistent_workers": workers > 0}
    ranks = distributed.current()
    if ranks.parallel:
        return (DataLoader(data.train, batch_size=batch_size, sampler=distributed.training_sampler(data.train, seed),
                           **common),  # type: ignore[arg-type]
                DataLoader(data.val, batch_size=batch_size, sampler=distributed.ShardSampler(data.val, ranks),
                           **common, **val_workers))  # type: ignore[arg-type]
    train = DataLoader(data.train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed),
                       **common)  # type: ignore[arg-type]
    val = DataLoader(data.val, batch_size=batch_size, **common, **val_workers)
    return train, val
