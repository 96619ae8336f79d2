"""Datasets as uint8 tensors, plus batched tensor augmentation.

Every dataset is a `Dataset` of `Split`s holding uint8 images [N,3,H,W] and int64 labels.
Small data sets live in memory (on the GPU when there is one); augmentation (random crop with
4-pixel zero padding, horizontal flip) runs on whole batches with tensor ops, no PIL, no workers.

Names: `embedded` (default, no download), `cifar10`, `cifar100`, `folder:PATH`. Any of them can
be resized (`image_size`): antialiased bilinear on the uint8 tensors, rounded back to uint8.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import skimage.data
import torch
from PIL import Image
from skimage.transform import resize

from privbench.errors import UserError
from privbench.util.storage import atomic_write_bytes, tensor_bytes

# The embedded set: photographs that ship inside scikit-image (no pooch download needed).
# One class per photograph. Grey ones are repeated to three channels.
EMBEDDED_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "camera",
    "coins",
    "clock",
)
# Geometry of each version of the embedded set. Photographs are shrunk to `short_side` px and
# cut into `tile`-px tiles; every tile belongs to one split (`fractions`). Crops of one tile are
# near-copies, so the number of test *tiles*, not crops, bounds how precisely accuracy is
# measured: version 3 has 4x the test tiles of version 2 (docs/precision.md). Version 2 stays
# readable so run folders trained on it are attacked on their own data.
EMBEDDED_VERSIONS: dict[int, dict] = {
    2: dict(short_side=192, tile=48, fractions={"train": 0.6, "aux": 0.2, "test": 0.2}, n_aux=1000, n_test=1000),
    3: dict(short_side=320, tile=40, fractions={"train": 0.6, "aux": 0.15, "test": 0.25}, n_aux=1000, n_test=2000),
}
EMBEDDED_VERSION = 3  # the current one
EMBEDDED_CROP = 32  # the crops' size in pixels
DATASETS = ("embedded", "cifar10", "cifar100", "folder:PATH")
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
CIFAR_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N,C,H,W]
    labels: torch.Tensor  # int64 [N]
    # int64 [N]: the source unit of each image (embedded: its tile). Images of one group are not
    # independent samples, so confidence intervals resample groups. None: every image its own.
    groups: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> Split:
        groups = self.groups.to(device) if self.groups is not None else None
        return Split(self.images.to(device), self.labels.to(device), groups)

    def subset(self, index: torch.Tensor | slice) -> Split:
        groups = self.groups[index] if self.groups is not None else None
        return Split(self.images[index], self.labels[index], groups)

    def group_ids(self) -> torch.Tensor:
        """Group of each image; every image its own group when the data set has none."""
        return self.groups if self.groups is not None else torch.arange(len(self), device=self.labels.device)


@dataclass
class Dataset:
    name: str
    classes: list[str]
    train: Split
    test: Split
    aux: Split | None = None  # disjoint attacker data, where the data set has it

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    def to(self, device: torch.device | str) -> Dataset:
        aux = self.aux.to(device) if self.aux is not None else None
        return Dataset(self.name, self.classes, self.train.to(device), self.test.to(device), aux)


def cache_dir() -> Path:
    root = os.environ.get("PRIVBENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "privbench"
    )
    return Path(root)


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    download: bool = False,
    seed: int = 0,
    n_train: int | None = None,
    n_test: int | None = None,
    image_size: int | None = None,
    version: int = EMBEDDED_VERSION,
) -> Dataset:
    """Load a data set by name, its images `image_size` pixels a side (None: the native size;
    an image folder's is 32). Raises UserError with the expected location when absent."""
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise UserError(f"invalid image size {image_size!r}: a positive number of pixels")
    if name == "embedded":
        return embedded(seed=seed, n_train=n_train or 5000, n_test=n_test, version=version, image_size=image_size)
    if name in CIFAR_FOLDERS:
        return resized(cifar(name, data_dir=data_dir, download=download), image_size)
    if name.startswith("folder:"):
        return image_folder(name[len("folder:") :], image_size=image_size or FOLDER_SIZE, seed=seed)
    raise UserError(f"unknown dataset {name!r} (known: {', '.join(DATASETS)})")


FOLDER_SIZE = 32  # an image folder's images are read at this size unless image_size says otherwise
RESIZE_BATCH = 512  # images resized at once (float copies of 224 px images are large)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N,C,H,W] -> uint8 [N,C,size,size]: antialiased bilinear, rounded; the same tensor
    when it already has that size."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    out = [
        torch.nn.functional.interpolate(
            images[i : i + RESIZE_BATCH].float(),
            size=(size, size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        .round_()
        .clamp_(0, 255)
        .to(torch.uint8)
        for i in range(0, len(images), RESIZE_BATCH)
    ]
    return torch.cat(out) if out else images.new_zeros((0, images.shape[1], size, size))


def resized(data: Dataset, size: int | None) -> Dataset:
    """The data set with every split's images resized to `size` (None: as it is)."""
    if size is None:
        return data

    def split(s: Split | None) -> Split | None:
        return None if s is None else Split(resize_images(s.images, size), s.labels, s.groups)

    return Dataset(data.name, data.classes, split(data.train), split(data.test), split(data.aux))


# ---------------------------------------------------------------------------------- embedded


def _photo(name: str, short_side: int) -> np.ndarray:

    img = np.asarray(getattr(skimage.data, name)())
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = img[..., :3]
    h, w = img.shape[:2]
    scale = short_side / min(h, w)
    out = resize(img, (round(h * scale), round(w * scale)), anti_aliasing=True, preserve_range=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def embedded_crops(
    seed: int, counts: dict[str, int], size: int = 32, version: int = EMBEDDED_VERSION
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Crops per split: {split: (images uint8 [N,3,s,s], labels, boxes [N,4] x0,y0,x1,y1, tiles [N])}.

    Each photograph is cut into tiles and every tile is given to one split (seeded shuffle, the
    version's fractions). A crop lies wholly inside one tile, so crops of different splits share
    no pixel. From version 3 crops are dealt to a split's tiles in turn (every tile gets its
    share, so no tile weighs more than another in a test score); version 2 drew tiles at random.
    `tiles` numbers the tiles globally. Everything comes from one numpy Generator(seed).
    """
    geo = EMBEDDED_VERSIONS[version]
    rng = np.random.default_rng(seed)
    splits = list(counts)
    out: dict[str, list] = {s: ([], [], [], []) for s in splits}
    tile_base = 0
    for label, photo_name in enumerate(EMBEDDED_PHOTOS):
        img = _photo(photo_name, geo["short_side"])
        h, w = img.shape[:2]
        t = geo["tile"]
        tiles = np.array([(x, y) for y in range(0, h - t + 1, t) for x in range(0, w - t + 1, t)])
        if version >= 3:  # constant tiles (the retina's black corners) give the same crop in every split
            tiles = tiles[[img[y : y + t, x : x + t].std() >= 1 for x, y in tiles]]
        order = rng.permutation(len(tiles))
        edges = np.cumsum([0] + [geo["fractions"][s] for s in splits])
        edges = np.rint(edges / edges[-1] * len(tiles)).astype(int)
        for i, split in enumerate(splits):
            own = order[edges[i] : edges[i + 1]]
            n = counts[split] // len(EMBEDDED_PHOTOS) + (label < counts[split] % len(EMBEDDED_PHOTOS))
            if version >= 3:
                pick = own[(np.arange(n) + rng.integers(0, len(own))) % len(own)]
            else:
                pick = own[rng.integers(0, len(own), n)]
            xs = tiles[pick, 0] + rng.integers(0, t - size + 1, n)
            ys = tiles[pick, 1] + rng.integers(0, t - size + 1, n)
            crops = np.stack([img[y : y + size, x : x + size] for x, y in zip(xs, ys)])
            out[split][0].append(crops.transpose(0, 3, 1, 2))
            out[split][1].append(np.full(n, label, dtype=np.int64))
            out[split][2].append(np.stack([xs, ys, xs + size, ys + size], axis=1))
            out[split][3].append(tile_base + pick)
        tile_base += len(tiles)
    return {s: tuple(np.concatenate(v) for v in vals) for s, vals in out.items()}  # type: ignore


def embedded(
    seed: int = 0,
    n_train: int = 5000,
    n_test: int | None = None,
    n_aux: int | None = None,
    version: int = EMBEDDED_VERSION,
    image_size: int | None = None,
) -> Dataset:
    """The default data set: 10 classes of 32x32 crops of scikit-image photographs (resized to
    `image_size` when given).

    Built once per (version, seed, sizes, image size) and cached on disk as a uint8 tensor file.
    """
    if version not in EMBEDDED_VERSIONS:
        raise UserError(f"unknown embedded data version {version} (known: {', '.join(map(str, EMBEDDED_VERSIONS))})")
    n_aux = EMBEDDED_VERSIONS[version]["n_aux"] if n_aux is None else n_aux
    n_test = EMBEDDED_VERSIONS[version]["n_test"] if n_test is None else n_test
    key = f"embedded-v{version}-s{seed}-{n_train}-{n_aux}-{n_test}"
    resize = image_size is not None and image_size != EMBEDDED_CROP
    if resize:
        key += f"-px{image_size}"
    path = cache_dir() / f"{key}.pt"
    parts = ("images", "labels", "groups")
    blob = None
    if path.exists():
        try:
            blob = torch.load(path, weights_only=True)
        except Exception:  # a damaged cache file is rebuilt, never trusted
            blob = None
    if not isinstance(blob, dict) or any(f"{s}_{p}" not in blob for s in ("train", "aux", "test") for p in parts):
        if resize:  # the native set (cached on its own), resized
            native = embedded(seed=seed, n_train=n_train, n_test=n_test, n_aux=n_aux, version=version)
            blob = {f"{s}_{p}": getattr(getattr(native, s), p) for s in ("train", "aux", "test") for p in parts}
            for s in ("train", "aux", "test"):
                blob[f"{s}_images"] = resize_images(blob[f"{s}_images"], image_size)
        else:
            crops = embedded_crops(seed, {"train": n_train, "aux": n_aux, "test": n_test}, version=version)
            blob = {
                f"{s}_{p}": torch.from_numpy(crops[s][i]).to(torch.uint8 if p == "images" else torch.int64)
                for s in crops
                for p, i in zip(parts, (0, 1, 3))
            }
        atomic_write_bytes(path, tensor_bytes(blob))
    splits = {s: Split(*(blob[f"{s}_{p}"] for p in parts)) for s in ("train", "aux", "test")}
    return Dataset("embedded", list(EMBEDDED_PHOTOS), splits["train"], splits["test"], splits["aux"])


# ------------------------------------------------------------------------------------ CIFAR


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def cifar(name: str, *, data_dir: str | Path | None = None, download: bool = False) -> Dataset:
    """CIFAR-10/100 from the standard python-pickle folder under `data_dir` (default ./data)."""
    root = Path(data_dir or "data")
    folder = root / CIFAR_FOLDERS[name]
    if not folder.is_dir() and download:
        _download_cifar(name, root)
    if not folder.is_dir():
        raise UserError(
            f"{name} not found: expected the python-pickle folder {folder} "
            f"(pass --data-dir, or --download where the machine is online)"
        )
    if name == "cifar10":
        train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
        test_files, label_key = [folder / "test_batch"], "labels"
        classes = _unpickle(folder / "batches.meta")["label_names"]
    else:
        train_files, test_files, label_key = [folder / "train"], [folder / "test"], "fine_labels"
        classes = _unpickle(folder / "meta")["fine_label_names"]
    missing = [str(f) for f in train_files + test_files if not f.is_file()]
    if missing:
        raise UserError(f"{name} folder {folder} is incomplete: missing {missing[0]}")

    def read(files: list[Path]) -> Split:
        batches = [_unpickle(f) for f in files]
        x = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)
        y = np.concatenate([np.asarray(b[label_key]) for b in batches]).astype(np.int64)
        return Split(torch.from_numpy(x.astype(np.uint8)), torch.from_numpy(y))

    return Dataset(name, list(classes), read(train_files), read(test_files))


def _download_cifar(name: str, root: Path) -> None:

    root.mkdir(parents=True, exist_ok=True)
    archive = root / Path(CIFAR_URLS[name]).name
    try:
        urllib.request.urlretrieve(CIFAR_URLS[name], archive)
    except OSError as exc:
        raise UserError(f"cannot download {name}: {exc}") from exc
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")


# ------------------------------------------------------------------------------ ImageFolder

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


def folder_fingerprint(path: str | Path) -> str:
    """A short hash of an image folder's content: every class folder and image file (relative
    path, size, modification time). Part of a folder data set's run identity, so adding,
    removing or editing an image gives a new run instead of reusing a stale one."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"image folder not found: {root} (expected class sub-folders of images)")
    h = hashlib.sha256()
    try:
        for p in sorted(root.rglob("*")):
            if p.is_dir():
                h.update(f"{p.relative_to(root).as_posix()}/\n".encode())
            elif p.suffix.lower() in IMAGE_SUFFIXES:
                st = p.stat()
                h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    except OSError as exc:
        raise UserError(f"cannot read image folder {root}: {exc}") from None
    return h.hexdigest()[:16]


def image_folder(path: str | Path, *, image_size: int = 32, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """ImageFolder layout (one sub-folder of images per class), resized to image_size.

    If `train/` and `test/` (or `val/`) sub-folders exist they are the splits; otherwise a
    seeded `test_fraction` of each class is held out as the test split.
    """

    root = Path(path)
    if not root.is_dir():
        raise UserError(f"image folder not found: {root} (expected class sub-folders of images)")

    def read_tree(folder: Path, classes: list[str]) -> Split:
        xs, ys = [], []
        for label, cls in enumerate(classes):
            for f in sorted((folder / cls).iterdir()) if (folder / cls).is_dir() else []:
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    try:
                        with Image.open(f) as im:
                            im = im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
                            xs.append(np.asarray(im).transpose(2, 0, 1))
                    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                        raise UserError(f"cannot read image {f}: {exc}") from None  # truncated or not an image
                    ys.append(label)
        if not xs:
            raise UserError(f"no images found under {folder}")
        return Split(torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.int64))

    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
        return Dataset(f"folder:{root.name}", classes, read_tree(root / "train", classes), read_tree(test_dir, classes))
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise UserError(f"image folder {root} has no class sub-folders")
    full = read_tree(root, classes)
    gen = torch.Generator().manual_seed(seed)
    test_mask = torch.zeros(len(full), dtype=torch.bool)
    for c in range(len(classes)):
        idx = (full.labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        test_mask[idx[: int(round(len(idx) * test_fraction))]] = True
    return Dataset(f"folder:{root.name}", classes, full.subset(~test_mask), full.subset(test_mask))


# ----------------------------------------------------------------------------- augmentation


def augment(
    images: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4, mode: str = "constant"
) -> torch.Tensor:
    """Random crop with `pad`-pixel padding (zeros; or torch's "reflect" / "replicate") plus
    horizontal flip, batched on any device.

    uint8 [N,C,H,W] in, uint8 out. One gather, no per-image Python.
    """
    n, c, h, w = images.shape
    dev = images.device
    if mode == "constant":
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    else:  # torch pads uint8 with zeros only
        padded = torch.nn.functional.pad(images.float(), (pad, pad, pad, pad), mode=mode).to(images.dtype)
    off = torch.randint(0, 2 * pad + 1, (2, n), device=dev, generator=generator)
    flip = torch.randint(0, 2, (n,), device=dev, generator=generator).bool()
    rows = off[0, :, None] + torch.arange(h, device=dev)  # [N,H]
    cols = torch.arange(w, device=dev).expand(n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + off[1, :, None]  # [N,W]
    return padded[
        torch.arange(n, device=dev)[:, None, None, None],
        torch.arange(c, device=dev)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [0,1]."""
    return images.float().div_(255)


def image_hash_list(images: torch.Tensor) -> list[str]:
    """Content hash of each image, in order."""
    arr = images.detach().cpu().contiguous().numpy()
    return [hashlib.sha1(a.tobytes()).hexdigest() for a in arr]


def image_hashes(images: torch.Tensor) -> set[str]:
    """Content hashes of a set of images, to prove two image sets share nothing."""
    return set(image_hash_list(images))
