import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from privbench.engine.data import (
    EMBEDDED_PHOTOS,
    augment,
    cifar,
    embedded,
    embedded_crops,
    image_folder,
    image_hashes,
    load_dataset,
)
from privbench.errors import UserError


def test_embedded_deterministic_for_a_seed():
    a = embedded_crops(3, {"train": 40, "test": 20})
    b = embedded_crops(3, {"train": 40, "test": 20})
    c = embedded_crops(4, {"train": 40, "test": 20})
    for split in ("train", "test"):
        for x, y in zip(a[split], b[split]):
            np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a["train"][0], c["train"][0])


def test_embedded_splits_are_disjoint_regions():
    crops = embedded_crops(0, {"train": 600, "aux": 200, "test": 200})
    for label in range(len(EMBEDDED_PHOTOS)):
        boxes = {s: crops[s][2][crops[s][1] == label] for s in crops}
        for s1, s2 in (("train", "test"), ("train", "aux"), ("aux", "test")):
            a, b = boxes[s1][:, None, :], boxes[s2][None, :, :]
            overlap_x = (a[..., 0] < b[..., 2]) & (b[..., 0] < a[..., 2])
            overlap_y = (a[..., 1] < b[..., 3]) & (b[..., 1] < a[..., 3])
            assert not (overlap_x & overlap_y).any(), f"{s1}/{s2} crops overlap for class {label}"


def test_embedded_default_sizes_and_cache():
    d = embedded()
    assert d.num_classes == 10 and d.image_shape == (3, 32, 32)
    assert len(d.train) >= 5000 and len(d.test) >= 1000
    assert d.train.images.dtype == torch.uint8
    assert torch.bincount(d.train.labels).tolist() == [500] * 10
    assert not image_hashes(d.train.images) & image_hashes(d.test.images)
    again = embedded()  # from the cache file
    assert torch.equal(again.train.images, d.train.images)


def _write_cifar(root, name, n_train=12, n_test=6):
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for fname in files:
            n = n_test if fname == "test_batch" else n_train
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            with open(folder / fname, "wb") as f:
                pickle.dump({"data": data, "labels": list(rng.integers(0, 10, n))}, f)
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        with open(folder / "meta", "wb") as f:
            pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
        for fname, n in (("train", n_train), ("test", n_test)):
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            with open(folder / fname, "wb") as f:
                pickle.dump({"data": data, "fine_labels": list(rng.integers(0, 100, n))}, f)
    return folder


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_loader_on_tiny_pickle_folder(tmp_path, name, classes):
    folder = _write_cifar(tmp_path, name)
    d = load_dataset(name, data_dir=tmp_path)
    assert d.num_classes == classes
    n_train = 60 if name == "cifar10" else 12
    assert d.train.images.shape == (n_train, 3, 32, 32) and len(d.test) == 6
    # Row-major CHW layout as in the CIFAR files: red plane first.
    first = pickle.load(open(folder / ("test_batch" if name == "cifar10" else "test"), "rb"))
    np.testing.assert_array_equal(d.test.images[0].numpy().reshape(-1), first["data"][0])


def test_cifar_missing_names_expected_folder(tmp_path):
    with pytest.raises(UserError, match="cifar-10-batches-py"):
        cifar("cifar10", data_dir=tmp_path)


def _write_folder(root, classes=("cat", "dog"), per_class=5, size=20):
    rng = np.random.default_rng(1)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_image_folder_resizes_and_splits(tmp_path):
    _write_folder(tmp_path)
    d = load_dataset(f"folder:{tmp_path}", image_size=16)
    assert d.classes == ["cat", "dog"]
    assert d.train.images.shape[1:] == (3, 16, 16)
    assert len(d.train) + len(d.test) == 10 and len(d.test) == 2
    assert not image_hashes(d.train.images) & image_hashes(d.test.images)


def test_image_folder_with_train_test_subfolders(tmp_path):
    _write_folder(tmp_path / "train", per_class=3)
    _write_folder(tmp_path / "val", per_class=2)
    d = image_folder(tmp_path, image_size=8)
    assert len(d.train) == 6 and len(d.test) == 4


def test_image_folder_missing(tmp_path):
    with pytest.raises(UserError, match="not found"):
        image_folder(tmp_path / "nope")


def test_augment_is_a_padded_crop_or_its_mirror():
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = augment(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    flips = 0
    for i in range(len(x)):
        candidates = [
            (flip, padded[i, :, dy : dy + 8, dx : dx + 8])
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
        ]
        matches = [f for f, c in candidates if torch.equal(c.flip(-1) if f else c, out[i])]
        assert matches, f"image {i} is not a crop of its padded original"
        flips += all(matches)
    assert 0 < flips < len(x)  # both branches occur
