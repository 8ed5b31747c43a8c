"""Cheap fingerprints of a SOURCE's splits, to tell whether a study's data changed under the same name.

    fingerprint("~/data/flowers", "train")   # 'classes=5 files=3670 bytes=228813683 hash=9f2c0e41d7a3b815'
    source_fingerprint("mnist5k")            # {'train': 'files=1 bytes=821722 hash=...', 'val': ...}
    describe_change(old, new)                # 'train: 10 → 11 classes, 500 → 560 files'

Nothing is decoded. An ImageFolder split is its class names and, for every image file under
them (hidden entries and empty files left out, as `SafeImageFolder` leaves them out), the path,
size and modification time: adding a class or an image, or rewriting one, changes the hash. A
bundled source (`mnist5k`, `fashion-mnist`) is the SHA-256 of its file. `fashion-mnist:ROOT` is
its split's two idx files; a torchvision `NAME:ROOT` every file under ROOT (size and mtime).
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from spach.data import fashion_mnist, mnist5k
from spach.data.datasets import TORCHVISION, class_folders

BUNDLED = {"mnist5k": mnist5k.NPZ, "fashion-mnist": fashion_mnist.NPZ}
FIELDS = ("classes", "files", "bytes")


def fingerprint(source: str, split: str) -> str:
    """'classes=N files=N bytes=N hash=H' (classes only where the source has class folders) of a split."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if source in BUNDLED:
        return _bundled(str(BUNDLED[source]))
    name, sep, root = source.partition(":")
    if sep and name == "fashion-mnist":
        root_path = Path(root).expanduser()
        files = [fashion_mnist.idx_path(root_path, f) for f in fashion_mnist.FILES[split]]
        return _summary(None, [(p.name, p.stat()) for p in files])
    if sep and name.lower() in TORCHVISION:
        root_path = Path(os.path.expanduser(root))
        return _summary(None, list(_walk(root_path, root_path, lambda _: True)))
    directory = Path(source).expanduser() / split
    if not directory.is_dir():
        raise FileNotFoundError(f"data not found: {directory} (fingerprint of {source!r}, split {split})")
    from torchvision.datasets.folder import IMG_EXTENSIONS

    classes = class_folders(directory)
    files = [f for c in classes for f in _walk(directory / c, directory, lambda n: n.lower().endswith(IMG_EXTENSIONS))]
    return _summary(classes, files)


def source_fingerprint(source: str) -> dict[str, str]:
    """{split: fingerprint} of both splits."""
    return {split: fingerprint(source, split) for split in ("train", "val")}


@functools.lru_cache(maxsize=None)
def _bundled(path: str) -> str:
    data = Path(path).read_bytes()
    return f"files=1 bytes={len(data)} hash={hashlib.sha256(data).hexdigest()[:16]}"


def _walk(top: Path, relative_to: Path, wanted):
    """(relative path, stat) of the wanted, non-empty, non-hidden files under `top`; each folder once."""
    seen, stack = set(), [top]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop, or a second link to one folder
            continue
        seen.add((st.st_dev, st.st_ino))
        for e in os.scandir(folder):
            if e.name.startswith("."):
                continue
            if e.is_dir():
                stack.append(Path(e.path))
            elif e.is_file() and wanted(e.name):
                stat = e.stat()
                if stat.st_size:
                    yield os.path.relpath(e.path, relative_to), stat


def _summary(classes: list[str] | None, files: list) -> str:
    h = hashlib.sha256()
    for c in classes or []:
        h.update(f"class {c}\n".encode())
    for rel, st in sorted(files, key=lambda f: f[0]):
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    head = f"classes={len(classes)} " if classes is not None else ""
    return f"{head}files={len(files)} bytes={sum(st.st_size for _, st in files)} hash={h.hexdigest()[:16]}"


def _fields(fp: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in fp.split() if "=" in part)


def describe_change(old: dict[str, str], new: dict[str, str]) -> str:
    """What changed between two `source_fingerprint`s, split by split: 'train: 10 → 11 classes, 500 → 560 files'."""
    parts = []
    for split in ("train", "val"):
        a, b = old.get(split, ""), new.get(split, "")
        if a == b:
            continue
        fa, fb = _fields(a), _fields(b)
        changes = [f"{fa.get(k, '?')} → {fb.get(k, '?')} {k}" for k in ("classes", "files") if fa.get(k) != fb.get(k)]
        if not changes and fa.get("bytes") != fb.get("bytes"):
            changes = [f"{fa.get('bytes', '?')} → {fb.get('bytes', '?')} bytes in the same number of files"]
        parts.append(f"{split}: " + (", ".join(changes) or "the same number of files and bytes, but files "
                                                          "renamed or rewritten (modification times)"))
    return "; ".join(parts) or "no change"
