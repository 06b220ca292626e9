"""Dataset sources: what samples each split has, their labels, and how a writer gets the bytes.

A source lists a split as `SourceSample`s (key, label, size estimate, reference) plus the
inputs it skipped while listing. `payload(split, samples)` turns references into what a writer
process needs: a file path (image trees) or a pixel array (Fashion-MNIST).
"""

from __future__ import annotations

import csv
import gzip
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Union

import numpy as np

from robustmim.errors import UserError
from robustmim.shards.config import ShardsConfig, SourceKind

Payload = Union[str, np.ndarray]  # an absolute file path, or uint8 pixels


@dataclass(frozen=True)
class SourceSample:
    key: str  # unique in its split; letters, digits, '_' and '-' only (tar and DALI index safe)
    label: int
    size_hint: int  # bytes the image is expected to take in the shard, for sizing shards
    ref: Union[str, int]  # path relative to the dataset root, or row of a pixel array


@dataclass(frozen=True)
class ClassInfo:
    index: int
    id: str  # wnid for ImageNet; the class name for Fashion-MNIST
    name: str


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


class Source(Protocol):
    kind: SourceKind
    root: Path
    classes: list[ClassInfo]
    # Metadata every image of the source shares, recorded in the manifest (e.g. mode, size).
    image_info: dict

    def list_split(self, split: str) -> tuple[list[SourceSample], list[Skipped]]: ...

    def payload(self, split: str, samples: list[SourceSample]) -> list[Payload]: ...


def safe_key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


# ---------------------------------------------------------------------------- Fashion-MNIST

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FASHION_FILES = {"train": "train", "val": "t10k"}  # our split -> the idx files' prefix
_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC = 2051, 2049


def read_idx_gz(path: Path, expected_magic: int) -> np.ndarray:
    """Read a gzip'd MNIST idx file (big-endian header, then uint8 data)."""
    if not path.is_file():
        raise UserError(f"Fashion-MNIST file not found: {path} (Debian package dataset-fashion-mnist)")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read gzip idx file: {e}") from None
    ndim = 3 if expected_magic == _IDX_IMAGES_MAGIC else 1
    header_len = 4 * (1 + ndim)
    if len(raw) < header_len:
        raise UserError(f"{path}: too short for an idx header")
    magic, *dims = struct.unpack(f">{1 + ndim}i", raw[:header_len])
    if magic != expected_magic:
        raise UserError(f"{path}: idx magic {magic}, expected {expected_magic}")
    expected_len = header_len + int(np.prod(dims))
    if len(raw) != expected_len:
        raise UserError(f"{path}: {len(raw)} bytes, the header {dims} implies {expected_len}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


class FashionMNIST:
    kind = SourceKind.fashion_mnist
    classes = [ClassInfo(i, name, name) for i, name in enumerate(FASHION_MNIST_CLASSES)]
    image_info = {"mode": "L", "width": 28, "height": 28}

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if split not in self._arrays:
            prefix = _FASHION_FILES[split]
            images = read_idx_gz(self.root / f"{prefix}-images-idx3-ubyte.gz", _IDX_IMAGES_MAGIC)
            labels_path = self.root / f"{prefix}-labels-idx1-ubyte.gz"
            labels = read_idx_gz(labels_path, _IDX_LABELS_MAGIC)
            if len(images) != len(labels):
                raise UserError(f"{labels_path}: {len(labels)} labels for {len(images)} images")
            if labels.max(initial=0) >= len(self.classes):
                raise UserError(f"{labels_path}: label {labels.max()} outside 0..{len(self.classes) - 1}")
            self._arrays[split] = (images, labels)
        return self._arrays[split]

    def list_split(self, split: str) -> tuple[list[SourceSample], list[Skipped]]:
        images, labels = self._load(split)
        prefix = _FASHION_FILES[split]
        size_hint = 400  # a 28x28 PNG is 200-500 bytes
        return [SourceSample(f"{prefix}_{i:05d}", int(labels[i]), size_hint, i) for i in range(len(labels))], []

    def payload(self, split: str, samples: list[SourceSample]) -> list[Payload]:
        images, _ = self._load(split)
        return list(images[[s.ref for s in samples]])


# ------------------------------------------------------------------------- ImageNet-style tree

VAL_SOLUTION_CSV = "LOC_val_solution.csv"
VAL_GROUND_TRUTH_TXT = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = ("meta.mat", "ILSVRC2012_devkit_t12/data/meta.mat", "data/meta.mat")
SYNSET_WORDS = ("LOC_synset_mapping.txt", "synset_words.txt")
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


def _scan_dir(path: Path) -> tuple[list[os.DirEntry], list[os.DirEntry], list["Skipped"]]:
    """(files, directories, skipped others) directly in `path`, each sorted by name. A broken
    symbolic link or anything else that is neither (a socket, a FIFO) is skipped, not lost."""
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError as e:
        raise UserError(f"cannot list {path}: {e.strerror}") from None
    files = [e for e in entries if e.is_file()]
    dirs = [e for e in entries if e.is_dir()]
    others = [Skipped(e.path, f"broken symbolic link (to {os.readlink(e.path)})" if e.is_symlink()
                      else "not a regular file or folder") for e in entries if not e.is_file() and not e.is_dir()]
    return files, dirs, others


class ImageTree:
    """ImageNet's layout: train/<wnid>/*.JPEG; val/ in class folders or flat with label files."""

    kind = SourceKind.imagenet

    def __init__(self, cfg: ShardsConfig):
        self.root = Path(cfg.input)
        self.cfg = cfg
        self.image_info: dict = {}  # sizes and modes vary from image to image
        if not self.root.is_dir():
            raise UserError(f"dataset root not found: {self.root}")
        class_root = self.root / "train" if (self.root / "train").is_dir() else self.root / "val"
        _, class_dirs, _ = _scan_dir(class_root) if class_root.is_dir() else ([], [], [])
        if not class_dirs:
            raise UserError(f"no class folders in {class_root} (expected {self.root}/train/<class>/*)")
        names = self._class_names()
        self.classes = [ClassInfo(i, d.name, names.get(d.name, d.name)) for i, d in enumerate(class_dirs)]
        self.class_index = {c.id: c.index for c in self.classes}

    def _class_names(self) -> dict[str, str]:
        """Human-readable names where a synset mapping file sits in the root (optional)."""
        for name in SYNSET_WORDS:
            path = self.root / name
            if path.is_file():
                pairs = (line.rstrip("\n").split(" ", 1) for line in path.read_text().splitlines() if line.strip())
                return {p[0]: (p[1] if len(p) > 1 else p[0]) for p in pairs}
        return {}

    def list_split(self, split: str) -> tuple[list[SourceSample], list[Skipped]]:
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise UserError(f"split folder not found: {split_dir}")
        files, dirs, others = _scan_dir(split_dir)
        samples, skipped = (self._list_class_folders(split_dir, dirs, files) if dirs
                            else self._list_flat_val(split_dir, files))
        return samples, others + skipped

    def _sample(self, entry: os.DirEntry, key: str, label: int) -> SourceSample:
        rel = os.path.relpath(entry.path, self.root)
        return SourceSample(safe_key(key), label, entry.stat().st_size, rel)

    def _list_class_folders(self, split_dir: Path, dirs, stray_files) -> tuple[list[SourceSample], list[Skipped]]:
        skipped = [Skipped(str(Path(f.path)), "file outside any class folder") for f in stray_files]
        samples = []
        for d in dirs:
            if d.name not in self.class_index:
                raise UserError(f"{d.path}: class folder '{d.name}' is not a class of {self.root}/train")
            files, subdirs, others = _scan_dir(Path(d.path))
            skipped += others + [Skipped(s.path, "directory inside a class folder") for s in subdirs]
            if not files:
                raise UserError(f"empty class folder: {d.path}")
            label = self.class_index[d.name]
            samples += [self._sample(f, f"{d.name}_{Path(f.name).stem}", label) for f in files]
        return _check_unique(samples, split_dir), skipped

    def _list_flat_val(self, split_dir: Path, files) -> tuple[list[SourceSample], list[Skipped]]:
        labels, label_file = self._val_labels(split_dir)
        samples, skipped, seen = [], [], set()
        for f in files:
            stem = Path(f.name).stem
            if stem not in labels:
                if Path(f.name).suffix.lower() in IMAGE_SUFFIXES:
                    raise UserError(f"{label_file} has no label for {f.path}: is it the label file of this val set?")
                skipped.append(Skipped(f.path, f"no label in {label_file.name} and not an image file name"))
                continue
            seen.add(stem)
            samples.append(self._sample(f, stem, labels[stem]))
        missing = sorted(set(labels) - seen)
        if missing:
            raise UserError(f"{label_file} lists {len(missing)} image(s) not in {split_dir}, e.g. {missing[:3]}")
        return _check_unique(samples, split_dir), skipped

    def _find(self, configured: str, names: tuple[str, ...], split_dir: Path) -> Path | None:
        if configured:
            path = Path(configured)
            if not path.is_file():
                raise UserError(f"label file not found: {path}")
            return path
        for name in names:
            for base in (self.root, split_dir):
                if (base / name).is_file():
                    return base / name
        return None

    def _val_labels(self, split_dir: Path) -> tuple[dict[str, int], Path]:
        path = self._find(self.cfg.val_labels, (VAL_SOLUTION_CSV, VAL_GROUND_TRUTH_TXT), split_dir)
        if path is None:
            raise UserError(f"{split_dir} has no class folders and no label file: put {VAL_SOLUTION_CSV} "
                            f"(or {VAL_GROUND_TRUTH_TXT} with the devkit's meta.mat) in {self.root}, "
                            "or set val_labels=...")
        if path.suffix == ".csv":
            return self._labels_from_solution_csv(path), path
        return self._labels_from_ground_truth(path, split_dir), path

    def _wnid_label(self, wnid: str, where: str) -> int:
        if wnid not in self.class_index:
            raise UserError(f"{where}: class '{wnid}' is not a class of {self.root}/train")
        return self.class_index[wnid]

    def _labels_from_solution_csv(self, path: Path) -> dict[str, int]:
        """LOC_val_solution.csv: `ImageId,PredictionString` with the wnid first in the string."""
        labels = {}
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
                raise UserError(f"{path}: expected the header 'ImageId,PredictionString'")
            for line_no, row in enumerate(reader, start=2):
                if len(row) < 2 or not row[1].split():
                    raise UserError(f"{path}:{line_no}: expected 'ImageId,<wnid> ...', got {row}")
                labels[row[0].strip()] = self._wnid_label(row[1].split()[0], f"{path}:{line_no}")
        return labels

    def _labels_from_ground_truth(self, path: Path, split_dir: Path) -> dict[str, int]:
        """ILSVRC2012_validation_ground_truth.txt: line i holds the ILSVRC2012_ID of image i."""
        synsets = self._devkit_synsets(split_dir)
        labels = {}
        for line_no, line in enumerate(path.read_text().split(), start=1):
            if not line.isdigit() or not 1 <= int(line) <= len(synsets):
                raise UserError(f"{path}:{line_no}: expected an ILSVRC2012_ID in 1..{len(synsets)}, got '{line}'")
            wnid = synsets[int(line) - 1]
            labels[f"ILSVRC2012_val_{line_no:08d}"] = self._wnid_label(wnid, f"{path}:{line_no}")
        return labels

    def _devkit_synsets(self, split_dir: Path) -> list[str]:
        """wnids in ILSVRC2012_ID order, from the devkit's meta.mat or a text file of wnids."""
        path = self._find(self.cfg.val_synsets, DEVKIT_META, split_dir)
        if path is None:
            raise UserError(f"{VAL_GROUND_TRUTH_TXT} needs the devkit's synset order: set "
                            "val_synsets=<devkit>/data/meta.mat (or a text file of wnids, one per line)")
        if path.suffix != ".mat":
            return path.read_text().split()
        import scipy.io

        try:
            synsets = scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=False)["synsets"]
            by_id = {int(s.ILSVRC2012_ID): str(s.WNID) for s in synsets if int(s.num_children) == 0}
        except (KeyError, AttributeError, ValueError, TypeError) as e:
            raise UserError(f"{path}: not the ILSVRC2012 devkit's meta.mat ({e})") from None
        if sorted(by_id) != list(range(1, len(by_id) + 1)):
            raise UserError(f"{path}: leaf ILSVRC2012_IDs are not 1..{len(by_id)}")
        return [by_id[i] for i in range(1, len(by_id) + 1)]

    def payload(self, split: str, samples: list[SourceSample]) -> list[Payload]:
        return [str(self.root / s.ref) for s in samples]


def _check_unique(samples: list[SourceSample], split_dir: Path) -> list[SourceSample]:
    seen: dict[str, str] = {}
    for s in samples:
        if s.key in seen:
            raise UserError(f"{split_dir}: '{s.ref}' and '{seen[s.key]}' map to the same sample key '{s.key}'")
        seen[s.key] = str(s.ref)
    return samples


def open_source(cfg: ShardsConfig) -> Source:
    if cfg.source is SourceKind.fashion_mnist:
        return FashionMNIST(cfg.input)
    return ImageTree(cfg)
