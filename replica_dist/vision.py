"""torchvision presets: an ImageFolder, CIFAR-10/100, MNIST and FashionMNIST, read from a local
`data.root` (nothing is ever downloaded).

torchvision is an optional extra (`pip install -e ".[vision]"`, pinned to the torch it was built
for): it is imported here, lazily, only when one of these presets is chosen, so the core never
needs it. `build_datasets(cfg, seed)` returns (train Dataset, test Dataset, VisionInfo); each
item is (float32 image tensor C x H x W, int label).

Layouts under data.root (those torchvision's own download writes, so a root prepared once by
torchvision works as is):
  imagefolder   train/<class>/<image> and val/<class>/<image> (or test/ when there is no val/);
                the same class folders in both, at least 2 (labels: folder names sorted)
  cifar10       cifar-10-batches-py/data_batch_1..5, test_batch (the "python version")
  cifar100      cifar-100-python/train, test
  mnist         MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte
  fashionmnist  FashionMNIST/raw/ (the same four files)

Train-time augmentation (random crop, flip) draws from torch's default generator, which the data
module's loader seeds for each sample it reads: a run resumed mid-epoch, with any number of
DataLoader workers, sees exactly the images an uninterrupted run sees.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from replica_dist.data_names import VISION_DATA
from replica_dist.errors import ConfigError, one_line

if TYPE_CHECKING:
    from replica_dist.config import DataConfig

INSTALL = 'pip install "replica_dist[vision]" (in a checkout: pip install -e ".[vision]")'
"""The extra pins torch==2.14.1 with torchvision==0.29.1: a venv of its own, beside the CPU torch."""


@dataclass(frozen=True)
class Preset:
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    flip: bool


# Channel statistics of each training set (ImageNet's for an ImageFolder, the usual choice).
# Digits are not mirror-symmetric, so MNIST is not flipped by default.
PRESETS = {
    "imagefolder": Preset((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 4, True),
    "cifar10": Preset((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 4, True),
    "cifar100": Preset((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 4, True),
    "mnist": Preset((0.1307,), (0.3081,), 2, False),
    "fashionmnist": Preset((0.2860,), (0.3530,), 2, True),
}


@dataclass(frozen=True)
class VisionInfo:
    num_outputs: int
    input_shape: tuple[int, ...]
    """Shape of one transformed sample (C, H, W)."""
    classes: tuple[str, ...]
    source: str
    """Where the images came from, as the user set it: `data.name=cifar10 data.root=...`."""
    task: str = "classification"
    loss: str = "cross_entropy"


def is_vision(name: str) -> bool:
    return name in VISION_DATA


def _torchvision(name: str):
    """torchvision's datasets and transforms, or one line saying how to install them."""
    try:
        import torchvision  # noqa: F401
        from torchvision import datasets, transforms
    except Exception as err:  # ImportError; or RuntimeError from a torchvision built for another torch
        raise ConfigError(
            f"data.name={name} needs torchvision, which cannot be imported here ({one_line(err)}); "
            f"install it with torch 2.14.1: {INSTALL}"
        ) from None
    return datasets, transforms


# ---- the layouts on disk


def _cifar_files(name: str) -> tuple[str, list[str], list[str], str]:
    if name == "cifar10":
        return "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"
    return "cifar-100-python", ["train"], ["test"], "fine_labels"


_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_MNIST_FOLDER = {"mnist": "MNIST", "fashionmnist": "FashionMNIST"}


def expected_layout(name: str) -> str:
    """What data.root must hold for preset `name`, in words."""
    if name == "imagefolder":
        return "train/<class>/<images> and val/<class>/<images> (or test/), at least 2 class folders"
    if name in ("cifar10", "cifar100"):
        folder, train, test, _ = _cifar_files(name)
        return f"{folder}/ with {', '.join(train + test)} (the python version, unpacked)"
    folder = _MNIST_FOLDER[name]
    return f"{folder}/raw/ with {', '.join(f for pair in _MNIST_FILES.values() for f in pair)} (unpacked)"


def _refuse(cfg: DataConfig, problem: str) -> ConfigError:
    return ConfigError(
        f"data.root {cfg.root}: {problem}; data.name={cfg.name} expects {expected_layout(cfg.name)} "
        f"(nothing is downloaded)"
    )


def _imagefolder_splits(cfg: DataConfig) -> tuple[str, str]:
    train = os.path.join(cfg.root, "train")
    test = next(
        (
            os.path.join(cfg.root, sub)
            for sub in ("val", "test")
            if os.path.isdir(os.path.join(cfg.root, sub))
        ),
        "",
    )
    if not os.path.isdir(train) or not test:
        missing = " and ".join(
            what for what, ok in (("train/", os.path.isdir(train)), ("val/ (or test/)", bool(test))) if not ok
        )
        raise _refuse(cfg, f"has no {missing}")
    train_classes, test_classes = _class_folders(train), _class_folders(test)
    if len(train_classes) < 2:
        raise _refuse(
            cfg,
            f"train/ holds {len(train_classes)} class folder{'s' if len(train_classes) != 1 else ''}"
            f"{' (' + train_classes[0] + ')' if train_classes else ''}: classification needs at least 2",
        )
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise _refuse(
            cfg,
            f"train/ and {os.path.basename(test)}/ hold different class folders "
            f"(only in train/: {only_train or 'none'}; only in {os.path.basename(test)}/: {only_test or 'none'})",
        )
    return train, test


def _class_folders(path: str) -> list[str]:
    return sorted(entry.name for entry in os.scandir(path) if entry.is_dir())


def check_root(cfg: DataConfig) -> None:
    """Refuse, in one line naming data.root, a root that cannot hold this preset's data; cheap
    (no image is read), so the config can be refused before anything is written."""
    _torchvision(cfg.name)
    if not os.path.isdir(cfg.root):
        raise _refuse(cfg, "does not exist or is not a directory")
    if cfg.name == "imagefolder":
        _imagefolder_splits(cfg)
        return
    if cfg.name in ("cifar10", "cifar100"):
        folder, train, test, _ = _cifar_files(cfg.name)
        wanted = [os.path.join(folder, f) for f in train + test]
    else:
        folder = os.path.join(_MNIST_FOLDER[cfg.name], "raw")
        wanted = [os.path.join(folder, f) for pair in _MNIST_FILES.values() for f in pair]
    missing = [f for f in wanted if not os.path.isfile(os.path.join(cfg.root, f))]
    if missing:
        packed = [f for f in missing if os.path.isfile(os.path.join(cfg.root, f + ".gz"))]
        hint = f" (found {packed[0]}.gz: unpack it with gunzip)" if packed else ""
        raise _refuse(cfg, f"lacks {', '.join(missing)}{hint}")


# ---- readers


class _SafeUnpickler(pickle.Unpickler):
    """CIFAR's batches are pickles: load numpy arrays, lists and dicts, never run other code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which is never loaded")
        return super().find_class(module, name)


def _read_cifar_batch(cfg: DataConfig, relative: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    path = os.path.join(cfg.root, relative)
    try:
        with open(path, "rb") as f:
            batch = _SafeUnpickler(f, encoding="latin1").load()
        # Python 2's pickles (the published files) load with str keys; Python 3's bytes may stay bytes
        batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (
        OSError,
        EOFError,
        pickle.UnpicklingError,
        KeyError,
        TypeError,
        ValueError,
        IndexError,
        AttributeError,
    ) as err:
        raise _refuse(cfg, f"{relative} is not a readable CIFAR batch ({one_line(err)})") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise _refuse(
            cfg,
            f"{relative} holds data of shape {data.shape} and {len(labels)} labels; "
            f"a CIFAR batch has N x 3072 bytes and N labels",
        )
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels  # N x H x W x C, as PIL wants


class ArrayImages(torch.utils.data.Dataset):
    """Images held as one uint8 array (N x H x W x C); items are (PIL image, label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...]):
        self.images, self.targets, self.classes = images, labels.tolist(), classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        from PIL import Image

        return Image.fromarray(np.ascontiguousarray(self.images[index])), self.targets[index]


def _cifar(cfg: DataConfig) -> tuple[ArrayImages, ArrayImages]:
    folder, train_files, test_files, label_key = _cifar_files(cfg.name)
    num_classes = 10 if cfg.name == "cifar10" else 100
    parts = {}
    for split, files in (("train", train_files), ("test", test_files)):
        batches = [_read_cifar_batch(cfg, os.path.join(folder, f), label_key) for f in files]
        images = np.concatenate([b[0] for b in batches])
        labels = np.concatenate([b[1] for b in batches])
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise _refuse(
                cfg,
                f"{split} labels reach {labels.max()}: data.name={cfg.name} has classes 0..{num_classes - 1}",
            )
        parts[split] = (images, labels)
    classes = tuple(str(c) for c in range(num_classes))
    return ArrayImages(*parts["train"], classes), ArrayImages(*parts["test"], classes)


def _mnist(cfg: DataConfig, datasets):
    cls = datasets.MNIST if cfg.name == "mnist" else datasets.FashionMNIST
    try:
        return cls(cfg.root, train=True, download=False), cls(cfg.root, train=False, download=False)
    except (RuntimeError, OSError, ValueError, AssertionError, EOFError) as err:
        raise _refuse(cfg, f"its files cannot be read as MNIST's idx format ({one_line(err)})") from None


def _imagefolder(cfg: DataConfig, datasets):
    train, test = _imagefolder_splits(cfg)
    try:
        return datasets.ImageFolder(train), datasets.ImageFolder(test)
    except (FileNotFoundError, OSError) as err:  # a class folder without a single image file
        raise _refuse(cfg, one_line(err)) from None


# ---- transforms


class Transformed(torch.utils.data.Dataset):
    """Items of `base` through `transform`. Random transforms draw from torch's default CPU
    generator, which the data module's loader seeds per sample (data._SeededSamples), so the
    draw does not depend on the DataLoader's workers or on where a run was resumed."""

    def __init__(self, base, transform):
        self.base, self.transform = base, transform
        self.targets, self.classes = [int(t) for t in base.targets], tuple(base.classes)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, target = self.base[index]
        return self.transform(image), target


class _PadCrop:
    """Pad by `padding` on every side, then crop back to the image's own size at a random place.
    Holds no module, so DataLoader workers started by spawn or forkserver can receive it."""

    def __init__(self, padding: int):
        self.padding = padding

    def __call__(self, image):
        from torchvision import transforms

        return transforms.RandomCrop((image.height, image.width), padding=self.padding)(image)

    def __repr__(self) -> str:
        return f"PadCrop(padding={self.padding})"


def _channels(cfg: DataConfig) -> int:
    return 1 if cfg.name in ("mnist", "fashionmnist") else 3


def normalization(cfg: DataConfig) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) per channel, or None with data.normalize=false; refuses a wrong length."""
    if not cfg.normalize:
        return None
    preset = PRESETS[cfg.name]
    mean = tuple(cfg.mean) or preset.mean
    std = tuple(cfg.std) or preset.std
    channels = _channels(cfg)
    for key, values in (("data.mean", mean), ("data.std", std)):
        if len(values) != channels:
            raise ConfigError(
                f"{key} has {len(values)} values but data.name={cfg.name} images have {channels} "
                f"channel{'s' if channels > 1 else ''}; got {list(values)}"
            )
    return mean, std


def build_transforms(cfg: DataConfig, transforms):
    """(train transform, test transform) from the config and the preset's defaults."""
    preset = PRESETS[cfg.name]
    common = []
    if cfg.image_size > 0:
        common += [transforms.Resize(cfg.image_size), transforms.CenterCrop(cfg.image_size)]
    augment = []
    if cfg.augment:
        padding = preset.crop_padding if cfg.crop_padding is None else cfg.crop_padding
        flip = preset.flip if cfg.flip is None else cfg.flip
        if padding > 0:
            augment.append(_PadCrop(padding))
        if flip:
            augment.append(transforms.RandomHorizontalFlip())
    tail = [transforms.ToTensor()]
    stats = normalization(cfg)
    if stats is not None:
        tail.append(transforms.Normalize(*stats))
    return transforms.Compose(common + augment + tail), transforms.Compose(common + tail)


def datasets(cfg: DataConfig, seed: int) -> tuple[Transformed, Transformed]:
    """(train Dataset, test Dataset) of preset data.name: the data module's DATASET_BUILDERS
    signature (`seed` is unused: the images are read, not drawn)."""
    return build_datasets(cfg, seed)[:2]


def build_datasets(cfg: DataConfig, seed: int = 0):
    """(train Dataset, test Dataset, VisionInfo) of preset data.name, read from data.root."""
    check_root(cfg)
    datasets, transforms = _torchvision(cfg.name)
    if cfg.name == "imagefolder":
        train, test = _imagefolder(cfg, datasets)
    elif cfg.name in ("cifar10", "cifar100"):
        train, test = _cifar(cfg)
    else:
        train, test = _mnist(cfg, datasets)
    if len(train) == 0 or len(test) == 0:
        raise _refuse(cfg, f"holds {len(train)} training and {len(test)} test images")
    train_transform, test_transform = build_transforms(cfg, transforms)
    train_set, test_set = Transformed(train, train_transform), Transformed(test, test_transform)
    try:
        input_shape = tuple(test_set[0][0].shape)
    except (OSError, ValueError) as err:
        raise _refuse(cfg, f"its first test image cannot be read ({one_line(err)})") from None
    info = VisionInfo(
        num_outputs=len(train_set.classes),
        input_shape=input_shape,
        classes=train_set.classes,
        source=f"data.name={cfg.name} data.root={cfg.root}",
    )
    return train_set, test_set, info
