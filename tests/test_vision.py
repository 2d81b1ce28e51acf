"""torchvision presets (replica_dist/vision.py) on data each test writes in tmp_path: an
ImageFolder of random PNGs, CIFAR batches in their pickled on-disk format, MNIST's idx files.
Nothing is downloaded.

torchvision is an optional extra: where it cannot be imported these tests are skipped, unless
REPLICA_DIST_REQUIRE_VISION=1 (CI's vision stage, .ci/run), where they run and fail instead.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from trainer_runs import REPO

from replica_dist.config import ConfigError, DataConfig, load_config


def _torchvision_missing() -> str | None:
    try:
        import torchvision  # noqa: F401
    except Exception as err:  # a torchvision built for another torch raises RuntimeError
        return f"torchvision cannot be imported ({' '.join(str(err).split())}); " + (
            'install the vision extra in its own venv: pip install -e ".[vision,test]"'
        )
    return None


MISSING = _torchvision_missing()
REQUIRED = os.environ.get("REPLICA_DIST_REQUIRE_VISION") == "1"
needs_torchvision = pytest.mark.skipif(MISSING is not None and not REQUIRED, reason=str(MISSING))
vision = pytest.mark.vision


# ---- data written by the tests, in each preset's on-disk format


def write_imagefolder(root, classes=("ant", "bee", "cat"), per_class=40, test_per_class=8, size=32, seed=0):
    """root/train/<class>/*.png and root/val/<class>/*.png of uniform random RGB pixels;
    returns {split: [(path, class index), ...]} in ImageFolder's order."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    files = {}
    for split, count in (("train", per_class), ("val", test_per_class)):
        files[split] = []
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                path = folder / f"{i:03d}.png"
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
                files[split].append((path, label))
    return files


def write_cifar(root, name="cifar10", per_batch=6, test=5, seed=0, protocol=2):
    """The python version's batches: dicts of N x 3072 uint8 rows (R, G, B planes) and labels."""
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        folder, files, key, classes = (
            root / "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            "labels",
            10,
        )
    else:
        folder, files, key, classes = root / "cifar-100-python", ["train"], "fine_labels", 100
    folder.mkdir(parents=True)
    written = {}
    test_file = "test_batch" if name == "cifar10" else "test"
    for file, count in [(f, per_batch) for f in files] + [(test_file, test)]:
        data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, count).tolist()
        with open(folder / file, "wb") as f:
            pickle.dump({"batch_label": "fake", "data": data, key: labels}, f, protocol=protocol)
        written[file] = (data, labels)
    return written


def _idx(path, array: np.ndarray) -> None:
    code = 0x08  # unsigned byte
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root, name="mnist", train=12, test=7, seed=0):
    rng = np.random.default_rng(seed)
    raw = root / ("MNIST" if name == "mnist" else "FashionMNIST") / "raw"
    raw.mkdir(parents=True)
    out = {}
    for split, prefix, count in (("train", "train", train), ("test", "t10k", test)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count).astype(np.uint8)
        _idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        out[split] = (images, labels)
    return out


def _cfg(name, root, **keys) -> DataConfig:
    return DataConfig(name=name, root=str(root), **keys)


def _pixels(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _as_tensor(hwc: np.ndarray) -> torch.Tensor:
    """What ToTensor gives for uint8 pixels (H x W x C or H x W): C x H x W floats in [0, 1]."""
    if hwc.ndim == 2:
        hwc = hwc[:, :, None]
    return torch.from_numpy(hwc.transpose(2, 0, 1).astype(np.float32) / 255.0)


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ---- without torchvision: one line naming data.name and the install command


@pytest.mark.parametrize("name", ["imagefolder", "cifar10", "mnist"])
def test_without_torchvision_a_preset_is_one_line_with_the_install_command(tmp_path, monkeypatch, name):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` raises ImportError
    with pytest.raises(ConfigError) as excinfo:
        load_config([f"data={name}", f"data.root={tmp_path}"])
    message = _one_line_error(excinfo)
    assert f"data.name={name} needs torchvision" in message
    assert 'pip install -e ".[vision]"' in message and "torch 2.14.1" in message


@pytest.mark.skipif(MISSING is None, reason="torchvision is importable here: the check runs in the main env")
def test_without_torchvision_the_trainer_exits_2_with_one_line(tmp_path):
    """The real absence (main env): the entry point says it once and writes nothing."""
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "replica_dist.train",
            "data=cifar10",
            f"data.root={tmp_path}",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "replica_dist: error: data.name=cifar10 needs torchvision"
    ), lines
    assert "pip install" in lines[0]
    assert not run_dir.exists()


def test_vision_keys_are_refused_for_other_data_and_ranges_checked():
    with pytest.raises(ConfigError, match="data.root"):
        load_config(["data.root=/somewhere"])  # digits would ignore it silently
    with pytest.raises(ConfigError, match="data.crop_padding must be >= 0; got -1"):
        DataConfig(name="cifar10", root="/x", crop_padding=-1)
    with pytest.raises(ConfigError, match="data.std must hold values > 0"):
        DataConfig(name="cifar10", root="/x", std=[0.2, 0.0, 0.2])
    with pytest.raises(ConfigError, match="data.root must be set for data.name=mnist"):
        DataConfig(name="mnist")
    with pytest.raises(ConfigError, match="data.root"):
        load_config(["data=cifar10"])  # root: ??? in conf/data/cifar10.yaml


# ---- ImageFolder


@vision
@needs_torchvision
def test_imagefolder_reads_every_image_with_its_class(tmp_path):
    from replica_dist.vision import build_datasets

    files = write_imagefolder(tmp_path)
    train, test, info = build_datasets(_cfg("imagefolder", tmp_path, augment=False, normalize=False), seed=0)
    assert (len(train), len(test)) == (120, 24)
    assert info.classes == ("ant", "bee", "cat") and info.num_outputs == 3
    assert info.input_shape == (3, 32, 32) and info.task == "classification"
    assert train.targets == [label for _, label in files["train"]]
    for dataset, split in ((train, "train"), (test, "val")):
        for index in (0, len(dataset) // 2 + 1, len(dataset) - 1):
            x, y = dataset[index]
            path, label = files[split][index]
            assert y == label
            assert x.dtype == torch.float32
            assert torch.equal(x, _as_tensor(_pixels(path)))


@vision
@needs_torchvision
def test_normalisation_uses_the_preset_or_the_given_statistics(tmp_path):
    from replica_dist.vision import build_datasets

    files = write_imagefolder(tmp_path, per_class=2, test_per_class=1)
    plain = _as_tensor(_pixels(files["val"][0][0]))
    imagenet = (torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225]))
    _, test, _ = build_datasets(_cfg("imagefolder", tmp_path), seed=0)
    expected = (plain - imagenet[0][:, None, None]) / imagenet[1][:, None, None]
    torch.testing.assert_close(test[0][0], expected, rtol=1e-6, atol=1e-6)
    _, test, _ = build_datasets(
        _cfg("imagefolder", tmp_path, mean=[0.5, 0.5, 0.5], std=[0.25, 0.5, 1.0]), seed=0
    )
    expected = (plain - 0.5) / torch.tensor([0.25, 0.5, 1.0])[:, None, None]
    torch.testing.assert_close(test[0][0], expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigError) as excinfo:
        build_datasets(_cfg("imagefolder", tmp_path, mean=[0.5]), seed=0)
    assert "data.mean has 1 values but data.name=imagefolder images have 3 channels" in _one_line_error(
        excinfo
    )


def _shifts_and_flips(image: torch.Tensor, padding: int, flip: bool):
    """Every image a pad-by-`padding`, crop-back, maybe-flip can give (zero padding)."""
    _, h, w = image.shape
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            yield crop
            if flip:
                yield crop.flip(-1)


@vision
@needs_torchvision
def test_augmentation_is_a_crop_and_flip_drawn_from_torchs_stream(tmp_path):
    from replica_dist.vision import build_datasets

    files = write_imagefolder(tmp_path, per_class=4, test_per_class=1)
    train, test, info = build_datasets(
        _cfg("imagefolder", tmp_path, normalize=False, crop_padding=3, flip=True)
    )
    assert info.input_shape == (3, 32, 32)
    differs = 0
    for index in range(len(train)):
        original = _as_tensor(_pixels(files["train"][index][0]))
        torch.manual_seed(100 + index)
        x, y = train[index]
        assert y == files["train"][index][1]
        assert any(torch.equal(x, c) for c in _shifts_and_flips(original, 3, True))
        # the loader seeds each sample (data._SeededSamples): the same seed, the same image
        torch.manual_seed(100 + index)
        assert torch.equal(train[index][0], x)
        torch.manual_seed(200 + index)
        differs += not torch.equal(train[index][0], x)
    assert differs >= len(train) - 2  # 49 * 2 placements: a repeat is rare
    # test images are never augmented
    assert torch.equal(test[0][0], _as_tensor(_pixels(files["val"][0][0])))
    plain, _, _ = build_datasets(_cfg("imagefolder", tmp_path, normalize=False, augment=False))
    assert torch.equal(plain[3][0], _as_tensor(_pixels(files["train"][3][0])))
    no_flip, _, _ = build_datasets(_cfg("imagefolder", tmp_path, normalize=False, crop_padding=0, flip=False))
    assert torch.equal(no_flip[5][0], _as_tensor(_pixels(files["train"][5][0])))


@vision
@needs_torchvision
def test_image_size_resizes_train_and_test(tmp_path):
    from replica_dist.vision import build_datasets

    write_imagefolder(tmp_path, per_class=2, test_per_class=1, size=40)
    train, test, info = build_datasets(_cfg("imagefolder", tmp_path, image_size=24), seed=0)
    assert info.input_shape == (3, 24, 24)
    assert train[0][0].shape == test[0][0].shape == (3, 24, 24)


@vision
@needs_torchvision
def test_imagefolder_refusals_name_data_root(tmp_path):
    from replica_dist.vision import build_datasets

    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError) as excinfo:
        load_config(["data=imagefolder", f"data.root={missing}"])
    message = _one_line_error(excinfo)
    assert message.startswith(f"data.root {missing}: does not exist") and "train/<class>" in message

    one = tmp_path / "one"
    write_imagefolder(one, classes=("only",), per_class=3, test_per_class=1)
    with pytest.raises(ConfigError) as excinfo:
        load_config(["data=imagefolder", f"data.root={one}"])
    message = _one_line_error(excinfo)
    assert (
        message.startswith(f"data.root {one}: train/ holds 1 class folder (only)") and "at least 2" in message
    )

    nosplit = tmp_path / "nosplit"
    write_imagefolder(nosplit, per_class=1, test_per_class=1)
    (nosplit / "val").rename(nosplit / "elsewhere")
    with pytest.raises(ConfigError, match=r"has no val/ \(or test/\)"):
        build_datasets(_cfg("imagefolder", nosplit), seed=0)

    # test/ is the fallback; its classes must be train's
    (nosplit / "elsewhere").rename(nosplit / "test")
    (nosplit / "test" / "cat").rename(nosplit / "test" / "dog")
    with pytest.raises(ConfigError) as excinfo:
        build_datasets(_cfg("imagefolder", nosplit), seed=0)
    assert "only in train/: ['cat']; only in test/: ['dog']" in _one_line_error(excinfo)

    empty = tmp_path / "empty"
    write_imagefolder(empty, per_class=1, test_per_class=1)
    for png in (empty / "train" / "bee").iterdir():
        png.unlink()
    with pytest.raises(ConfigError) as excinfo:
        build_datasets(_cfg("imagefolder", empty), seed=0)
    message = _one_line_error(excinfo)
    assert message.startswith(f"data.root {empty}:") and "bee" in message


# ---- CIFAR


@vision
@needs_torchvision
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_reads_the_python_batches(tmp_path, protocol):
    from replica_dist.vision import build_datasets

    written = write_cifar(tmp_path, protocol=protocol)
    train, test, info = build_datasets(_cfg("cifar10", tmp_path, augment=False, normalize=False), seed=0)
    assert (len(train), len(test)) == (30, 5)
    assert info.num_outputs == 10 and info.input_shape == (3, 32, 32)
    labels = [label for i in range(1, 6) for label in written[f"data_batch_{i}"][1]]
    assert train.targets == labels and test.targets == written["test_batch"][1]
    # row 2 of batch 3 is training image 2*6 + 2; a row is the R, G, B planes of 32 x 32
    row = written["data_batch_3"][0][2]
    assert torch.equal(train[14][0], torch.from_numpy(row.reshape(3, 32, 32).astype(np.float32) / 255))
    assert train[14][1] == written["data_batch_3"][1][2]
    assert torch.equal(
        test[4][0], torch.from_numpy(written["test_batch"][0][4].reshape(3, 32, 32) / np.float32(255))
    )


@vision
@needs_torchvision
def test_cifar100_reads_fine_labels_and_normalises_with_its_statistics(tmp_path):
    from replica_dist.vision import build_datasets

    written = write_cifar(tmp_path, name="cifar100", per_batch=9, test=4)
    train, test, info = build_datasets(_cfg("cifar100", tmp_path, augment=False), seed=0)
    assert (len(train), len(test), info.num_outputs) == (9, 4, 100)
    assert train.targets == written["train"][1]
    plain = torch.from_numpy(written["train"][0][0].reshape(3, 32, 32).astype(np.float32) / 255)
    mean, std = torch.tensor([0.5071, 0.4865, 0.4409]), torch.tensor([0.2673, 0.2564, 0.2762])
    torch.testing.assert_close(train[0][0], (plain - mean[:, None, None]) / std[:, None, None])


@vision
@needs_torchvision
def test_cifar_missing_or_incomplete_root_is_one_line(tmp_path):
    missing = tmp_path / "absent"
    with pytest.raises(ConfigError) as excinfo:
        load_config(["data=cifar10", f"data.root={missing}"])
    message = _one_line_error(excinfo)
    assert message.startswith(f"data.root {missing}: does not exist")
    assert "cifar-10-batches-py/ with data_batch_1" in message and "nothing is downloaded" in message

    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(ConfigError) as excinfo:
        load_config(["data=cifar10", f"data.root={tmp_path}"])
    assert _one_line_error(excinfo).startswith(
        f"data.root {tmp_path}: lacks cifar-10-batches-py/data_batch_3;"
    )

    with pytest.raises(
        ConfigError, match=f"data.root {tmp_path}: lacks cifar-100-python/train, cifar-100-python/test"
    ):
        load_config(["data=cifar100", f"data.root={tmp_path}"])


@vision
@needs_torchvision
def test_cifar_batch_that_is_not_one_is_refused_and_never_runs_code(tmp_path):
    from replica_dist.vision import build_datasets

    write_cifar(tmp_path)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(pickle.dumps({b"data": Payload(), b"labels": []}))
    with pytest.raises(ConfigError) as excinfo:
        build_datasets(_cfg("cifar10", tmp_path), seed=0)
    message = _one_line_error(excinfo)
    assert "data_batch_2 is not a readable CIFAR batch" in message and "never loaded" in message
    assert not marker.exists()

    batch.write_bytes(b"truncated")
    with pytest.raises(ConfigError, match="data_batch_2 is not a readable CIFAR batch"):
        build_datasets(_cfg("cifar10", tmp_path), seed=0)


# ---- MNIST and FashionMNIST


@vision
@needs_torchvision
@pytest.mark.parametrize("name", ["mnist", "fashionmnist"])
def test_mnist_reads_the_idx_files(tmp_path, name):
    from replica_dist.vision import build_datasets

    written = write_mnist(tmp_path, name=name)
    train, test, info = build_datasets(_cfg(name, tmp_path, augment=False, normalize=False), seed=0)
    assert (len(train), len(test), info.num_outputs) == (12, 7, 10)
    assert info.input_shape == (1, 28, 28)
    assert train.targets == written["train"][1].tolist()
    for dataset, split in ((train, "train"), (test, "test")):
        for index in (0, len(dataset) - 1):
            x, y = dataset[index]
            assert y == written[split][1][index]
            assert torch.equal(x, _as_tensor(written[split][0][index]))


@vision
@needs_torchvision
def test_mnist_defaults_crop_without_flip_and_normalise(tmp_path):
    from replica_dist.vision import build_datasets

    written = write_mnist(tmp_path)
    train, _, _ = build_datasets(_cfg("mnist", tmp_path))
    torch.manual_seed(1)
    moved = 0
    for index in range(len(train)):
        original = (_as_tensor(written["train"][0][index]) - 0.1307) / 0.3081
        x = train[index][0]
        assert x.shape == original.shape
        # padding is applied before normalising: padded pixels are (0 - mean) / std
        candidates = _shifts_and_flips(_as_tensor(written["train"][0][index]), 2, False)
        assert any(torch.allclose(x, (c - 0.1307) / 0.3081, atol=1e-6) for c in candidates), index
        moved += not torch.allclose(x, original, atol=1e-6)
    assert moved >= len(train) - 3  # 1 in 25 placements is the unshifted one


@vision
@needs_torchvision
def test_mnist_missing_files_and_packed_files_are_one_line(tmp_path):
    from replica_dist.vision import build_datasets

    write_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    labels = raw / "t10k-labels-idx1-ubyte"
    with gzip.open(raw / "t10k-labels-idx1-ubyte.gz", "wb") as packed:
        packed.write(labels.read_bytes())
    labels.unlink()
    with pytest.raises(ConfigError) as excinfo:
        load_config(["data=mnist", f"data.root={tmp_path}"])
    message = _one_line_error(excinfo)
    assert message.startswith(f"data.root {tmp_path}: lacks MNIST/raw/t10k-labels-idx1-ubyte")
    assert "gunzip" in message

    with pytest.raises(
        ConfigError, match=f"data.root {tmp_path}: lacks FashionMNIST/raw/train-images-idx3-ubyte"
    ):
        load_config(["data=fashionmnist", f"data.root={tmp_path}"])

    labels.write_bytes(b"\x00\x00")  # a torn file
    with pytest.raises(ConfigError) as excinfo:
        build_datasets(_cfg("mnist", tmp_path), seed=0)
    assert "cannot be read as MNIST's idx format" in _one_line_error(excinfo)


# ---- end to end: torchvision's resnet18 on a generated ImageFolder, in 2 and 4 gloo processes


def _loader_path_missing() -> str | None:
    """The acceptance run needs model._target_ (replica_dist.model) and the DataLoader path
    (replica_dist.data); each came on its own branch."""
    from replica_dist import data
    from replica_dist.config import ModelConfig

    if not hasattr(ModelConfig(), "_target_"):
        return "needs model._target_ (the h-model branch)"
    if "imagefolder" not in getattr(data, "DATASET_BUILDERS", {}):
        return "needs data.DATASET_BUILDERS with the vision presets (the h-data branch, wired to vision.datasets)"
    return None


E2E_STEPS = 4
E2E_CHECKPOINT_EVERY = 2
E2E_PER_CLASS = 8  # 24 training images: a shard of 6 (4 replicas) or 12 (2) per replica


def _e2e_overrides(root: str, run_dir: str) -> list[str]:
    from worlds import COLLECTIVE_TIMEOUT_S

    return [
        "data=imagefolder",
        f"data.root={root}",
        "data.num_workers=2",
        "model._target_=torchvision.models.resnet18",
        "+model.num_classes=3",
        f"train.steps={E2E_STEPS}",
        "train.batch_size=4",
        "log.every=1",
        f"eval.every={E2E_STEPS}",
        "eval.batch_size=64",
        f"checkpoint.every={E2E_CHECKPOINT_EVERY}",
        "optim.lr=0.01",
        "optim.momentum=0.9",
        "coupling.eta=0.01",
        f"dist.timeout_s={COLLECTIVE_TIMEOUT_S}",
        f"hydra.run.dir={run_dir}",
    ]


def _e2e_train(rank: int, world_size: int, root: str, run_dir: str, fail_at_step: int = 0) -> None:
    from pathlib import Path

    from worlds import fail_at_batch

    from replica_dist import loop
    from replica_dist.data import LoaderBatches

    # Under torchrun a rank's DataLoader workers are forked (Linux's default); these ranks come
    # from a forkserver, whose start method their workers would inherit, each importing torch and torchvision again
    # (8 of them per rank and run: nine tenths of this test's time). test_datasets_pickle_for_
    # spawned_loader_workers checks what a spawned worker receives.
    torch.multiprocessing.set_start_method("fork", force=True)
    if fail_at_step:
        fail_at_batch(LoaderBatches, fail_at_step)
    cfg, _ = load_config(_e2e_overrides(root, run_dir))
    loop.train(cfg, Path(run_dir), torch.device("cpu"))


def _reference(root: str, world_size: int) -> list[dict[str, torch.Tensor]]:
    """Every replica in this one process, by hand (replica_dist/reference.py's tanh rule with SGD
    and momentum), each drawing its batches from its own sampler over the same Dataset."""
    # One thread, as each process of the world: the same convolution sums, so the runs agree to
    # the last bit where the mean allows (a ResNet with BatchNorm on batches of 8 amplifies a
    # last-bit difference of the first step to 1e-2 by the sixth).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference_steps(root, world_size)
    finally:
        torch.set_num_threads(threads)


def _reference_steps(root: str, world_size: int) -> list[dict[str, torch.Tensor]]:
    from replica_dist.coupling import eta_at
    from replica_dist.data import LoaderBatches, ReplicaSampler, build_datasets, rank_indices
    from replica_dist.evaluate import LOSSES
    from replica_dist.loop import build_optimizer, replica_seed
    from replica_dist.model import build_model
    from replica_dist.reference import _weights

    cfg, _ = load_config(_e2e_overrides(root, "unused") + ["data.num_workers=0"])
    train_set, _, info = build_datasets(cfg.data, cfg.seed, torch.float32)
    models, optimizers, batches = [], [], []
    for r in range(world_size):
        model = build_model(cfg.model, info.input_shape, info.num_outputs, replica_seed(cfg.seed, r))
        models.append(model)
        optimizers.append(build_optimizer(cfg.optim, model.parameters()))
        mine = rank_indices(cfg.data, len(train_set), cfg.seed, r, world_size, 0, 1)
        sampler = ReplicaSampler(mine, cfg.train.batch_size, cfg.seed, r)
        batches.append(LoaderBatches(train_set, sampler, cfg.data, torch.device("cpu"), torch.float32))
    c, loss_fn, n = cfg.coupling, LOSSES[info.loss], world_size
    for step in range(1, cfg.train.steps + 1):
        eta = eta_at(c, step, cfg.train.steps)
        before = [[t.detach().clone() for t in _weights(m)] for m in models]
        total = _gloo_sum(before, cfg.dist.bucket_mb)
        for model, optimizer, replica_batches in zip(models, optimizers, batches):
            x, y = replica_batches.next()
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            optimizer.step()
        # w += eta * tanh((mean - w) / T), in the trainer's floating-point order: with the mean
        # = total / n folded into the scale, tanh((total - n w) / (n T)), and eta into the add.
        with torch.no_grad():
            for r, model in enumerate(models):
                for t, w, s in zip(_weights(model), before[r], total):
                    t.add_(torch.sub(s, w, alpha=n).mul_(1.0 / (n * c.temperature)).tanh_(), alpha=eta)
    return [m.state_dict() for m in models]


def _gloo_ring_sum(xs: list[torch.Tensor], max_segment_bytes: int = 1 << 20) -> torch.Tensor:
    """The sum of equally long flat tensors (one per rank) in the order in which gloo's ring
    all_reduce (gloo/allreduce.cc, ring(); 1 MiB segments) adds them for 4 ranks: the buffer is
    cut into 4 chunks of whole segments, and chunk c is summed as
    ((x[c+2] + x[c+3]) + x[c+1]) + x[c] (indices mod 4) as it travels the ring. Float addition
    is commutative but not associative, so this order, not torch.sum's ((x0 + x1) + x2) + x3,
    is what makes the reference agree bit for bit (checked against gloo for buffers of 1 to
    6.5M elements; were gloo to change its algorithm, the test below would fail at the first
    coupled step). For 2 ranks every order is x0 + x1."""
    world = len(xs)
    if world <= 2:
        return torch.stack(xs).sum(0)
    assert world == 4, "the order is established for 2 and 4 ranks only"
    n, size = xs[0].numel(), xs[0].element_size()
    segments = max(-(-n * size // max_segment_bytes), 2 * world)
    segments = -(-segments // world) * world
    per_chunk = -(-n // segments) * (segments // world)
    total = torch.empty_like(xs[0])
    for c in range(world):
        part = [x[c * per_chunk : (c + 1) * per_chunk] for x in xs]
        total[c * per_chunk : (c + 1) * per_chunk] = (
            (part[(c + 2) % 4] + part[(c + 3) % 4]) + part[(c + 1) % 4]
        ) + part[c]
    return total


def _gloo_sum(before: list[list[torch.Tensor]], bucket_mb: float) -> list[torch.Tensor]:
    """The replicas' sum of the pre-step weights as the trainer forms it: every replica's
    weights flattened into one buffer (replica_dist/dist.py, ReplicaExchange: the weights, then
    the guard's table of small integers, which any order sums exactly), all_reduced in buckets
    of at most bucket_mb MiB, each its own ring."""
    from replica_dist.guard import Guard

    world = len(before)
    flats = [
        torch.cat([t.reshape(-1) for t in ts] + [torch.zeros(world * Guard.WORD_LENGTH)]) for ts in before
    ]
    per_bucket = max(1, int(bucket_mb * 2**20 // flats[0].element_size()))
    total = torch.cat(
        [_gloo_ring_sum(list(bucket)) for bucket in zip(*(flat.split(per_bucket) for flat in flats))]
    )
    shapes = [t.shape for t in before[0]]
    sizes = [s.numel() for s in shapes]
    return [m.view(shape) for m, shape in zip(total[: sum(sizes)].split(sizes), shapes)]


@vision
@needs_torchvision
@pytest.mark.e2e
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("world_size", [2, 4])
def test_resnet18_on_an_imagefolder_in_gloo_worlds_matches_the_reference_and_resumes(tmp_path, world_size):
    missing = _loader_path_missing()
    if missing:
        pytest.skip(missing)
    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException
    from trainer_runs import replica_weights
    from worlds import run_world

    from replica_dist.data import rank_indices

    root = tmp_path / "images"
    write_imagefolder(root, per_class=E2E_PER_CLASS, test_per_class=2, size=16)
    cfg, _ = load_config(_e2e_overrides(str(root), str(tmp_path / "unused")))
    assert cfg.data.num_workers == 2
    num_train = 3 * E2E_PER_CLASS

    # each replica's shard: disjoint from the others', together all training images
    shards = [
        set(rank_indices(cfg.data, num_train, cfg.seed, r, world_size, 0, 1).tolist())
        for r in range(world_size)
    ]
    assert sum(len(s) for s in shards) == num_train and set().union(*shards) == set(range(num_train))

    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run_world(_e2e_train, world_size, str(root), str(reference), timeout_s=600)
    trained = replica_weights(reference, world_size)
    assert not torch.equal(trained[0]["conv1.weight"], trained[1]["conv1.weight"])
    # The sum in gloo's order (_gloo_sum): bit for bit, for 2 ranks as for 4.
    for got, expected in zip(trained, _reference(str(root), world_size)):
        for name in expected:
            assert torch.equal(got[name], expected[name]), name

    # interrupted after the first checkpoint, resumed with 2 workers: bit for bit
    with pytest.raises((ProcessRaisedException, ProcessExitedException)):
        run_world(_e2e_train, world_size, str(root), str(resumed), E2E_CHECKPOINT_EVERY + 1, timeout_s=600)
    assert not (resumed / "summary.json").exists()
    run_world(_e2e_train, world_size, str(root), str(resumed), timeout_s=600)
    for got, expected in zip(replica_weights(resumed, world_size), trained):
        for name in expected:
            assert torch.equal(got[name], expected[name]), name


@vision
@needs_torchvision
@pytest.mark.parametrize("name", ["imagefolder", "cifar10", "mnist"])
def test_datasets_pickle_for_spawned_loader_workers(tmp_path, name):
    """DataLoader workers started by spawn or forkserver (Python 3.14's default) receive the
    Dataset pickled: the same items come back."""
    from replica_dist.vision import build_datasets

    {"imagefolder": write_imagefolder, "cifar10": write_cifar, "mnist": write_mnist}[name](tmp_path)
    train, test, _ = build_datasets(_cfg(name, tmp_path))
    for dataset in (train, test):
        copy = pickle.loads(pickle.dumps(dataset))
        torch.manual_seed(3)
        x, y = dataset[1]
        torch.manual_seed(3)
        assert torch.equal(copy[1][0], x) and copy[1][1] == y
