"""A fast check of every file of a dataset before training: headers and shapes only.

:func:`scan_dataset` lists the cases of a file layout (``multirater``,
``medsam-npy``) and reads the header of each image and mask (PNG size and mode,
NIfTI header, ``.npy`` header), so that an unreadable file, a mask whose shape
does not fit its image, cases of different sizes without ``--spatial-size``, or a
mix of 2D and 3D files is reported in seconds, naming the files and the split
they belong to, instead of after an epoch. It also infers the spatial
dimensions (2 or 3) from the masks. Mask values are not read here (they are
checked when a case is loaded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .io import split_name

__all__ = ["ScanResult", "scan_dataset", "file_shape", "parse_label_map", "split_sizes"]

#: Fewer validation or test cases than this get a warning.
FEW_CASES = 5


@dataclass
class ScanResult:
    ids: List[str]
    spatial_dims: Optional[int]
    in_channels: Optional[int]
    sizes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)  # id -> spatial shape


def parse_label_map(value: Union[None, str, Dict[Any, Any]]):
    """``--label-map``: None, ``"binary"``, ``"0:0,128:1"`` or a mapping -> what the readers
    take."""
    if value is None or isinstance(value, dict):
        return None if value is None else {int(k): int(v) for k, v in value.items()}
    text = str(value).strip()
    if text == "binary":
        return "binary"
    out: Dict[int, int] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        raw, sep, lab = part.partition(":")
        try:
            if not sep:
                raise ValueError
            out[int(raw)] = int(lab)
        except ValueError:
            raise ValueError(
                f"label_map (--label-map): expected 'binary' or raw:label pairs such as "
                f"0:0,128:1, got {value!r}"
            ) from None
    if not out:
        raise ValueError(f"label_map (--label-map): no raw:label pairs in {value!r}")
    return out


def file_shape(path: Union[str, Path]) -> Tuple[int, ...]:
    """The array shape stored in ``path`` from its header (PNG: (H, W[, C]), as the readers
    give it)."""
    path = Path(path)
    ext = (split_name(path.name) or ("", ""))[1]
    try:
        if ext == ".npy":
            return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
        if ext == ".png":
            from PIL import Image

            with Image.open(path) as im:
                im.verify()  # the header and chunk checksums, without decoding
                w, h = im.size
                bands = len(im.getbands())  # a palette ("P") image is one band
            return (h, w) if bands == 1 else (h, w, bands)
        if ext in (".nii", ".nii.gz"):
            import nibabel

            return tuple(int(s) for s in nibabel.load(str(path)).shape)
    except Exception as exc:  # noqa: BLE001 (any reader error is a bad file)
        raise ValueError(f"cannot read {path} ({type(exc).__name__}: {exc})") from None
    raise ValueError(f"{path}: unsupported file type")


def _mask_shape(path: str) -> Tuple[int, ...]:
    shape = file_shape(path)
    if str(path).lower().endswith(".png") and len(shape) == 3 and shape[-1] in (3, 4):
        shape = shape[:2]  # an RGB(A) mask with equal channels is read as one channel
    return shape


def _image_channels(img: Tuple[int, ...], S: Tuple[int, ...]) -> Optional[int]:
    if img == S:
        return 1
    if len(img) == len(S) + 1:
        if img[1:] == S:
            return img[0]
        if img[:-1] == S:
            return img[-1]
    return None


def split_sizes(ids: Sequence[str], split_file=None, seed: int = 0) -> Dict[str, int]:
    from .splits import select_split

    return {s: len(select_split(ids, s, split_file, seed=seed)) for s in ("train", "val", "test")}


def _split_of(ids: Sequence[str], split_file, seed: int) -> Dict[str, str]:
    from .splits import select_split

    where: Dict[str, str] = {}
    for s in ("train", "val", "test"):
        for i in select_split(ids, s, split_file, seed=seed):
            where[i] = s
    return where


def _progress(items, n: int):
    if n < 200:
        return items
    from tqdm import tqdm

    return tqdm(items, total=n, desc="checking files", disable=None, leave=False)


def scan_dataset(
    layout: str,
    root,
    spatial_size: Optional[Sequence[int]] = None,
    split_file=None,
    seed: int = 0,
    splits: Optional[Sequence[str]] = None,
) -> ScanResult:
    """Check the headers of every case of ``root`` (only cases of ``splits`` when given).

    Raises ValueError naming the file, its case and split, what was expected and what
    to do; returns the case ids, the spatial dims and the image channels.
    """
    from .datasets import scan_medsam_npy, scan_multirater

    if layout == "multirater":
        cases, _, _ = scan_multirater(root)
    elif layout == "medsam-npy":
        cases = scan_medsam_npy(root)
    else:
        raise ValueError(f"scan_dataset reads file layouts, got {layout!r}")
    ids = [c["id"] for c in cases]
    where = _split_of(ids, split_file, seed)
    if splits is not None:
        cases = [c for c in cases if where.get(c["id"]) in splits or "all" in splits]
    sizes: Dict[str, Tuple[int, ...]] = {}
    channels: Dict[str, int] = {}
    first: Dict[int, str] = {}
    for case in _progress(cases, len(cases)):
        cid = case["id"]
        ctx = f" (case {cid!r}, {where.get(cid, 'no')} split)"
        masks = ([case["label"]] if case.get("label") else []) + list(case.get("raters") or [])
        S = None
        ref = None
        for m in masks:
            try:
                shape = _mask_shape(m)
            except ValueError as exc:
                raise ValueError(f"{exc}{ctx}; fix or remove the file") from None
            if S is None:
                S, ref = shape, m
            elif shape != S:
                raise ValueError(
                    f"shape mismatch: {m} has shape {shape} but {ref} has shape {S}"
                    f"{ctx}; the masks of a case must have the same shape"
                )
        try:
            img = file_shape(case["image"])
        except ValueError as exc:
            raise ValueError(f"{exc}{ctx}; fix or remove the file") from None
        ch = _image_channels(img, S)
        if ch is None:
            raise ValueError(
                f"shape mismatch: image {case['image']} has shape {img} but {ref} has "
                f"shape {S}{ctx}; expected the image to be {S}, (C, *{S}) or (*{S}, C)"
            )
        sizes[cid], channels[cid] = S, ch
        first.setdefault(len(S), case["image"])
    if len(first) > 1:
        kinds = ", ".join(f"{d}D (e.g. {p})" for d, p in sorted(first.items()))
        raise ValueError(
            f"{root} mixes cases of different dimensions: {kinds}; put 2D and 3D data "
            "in separate datasets"
        )
    dims = next(iter(first)) if first else None
    if dims not in (None, 2, 3):
        raise ValueError(
            f"{root}: masks have {dims} dimensions (e.g. {first[dims]}); expected 2D or 3D masks"
        )
    chans = sorted(set(channels.values()))
    if len(chans) > 1:
        ex = {c: next(i for i, v in channels.items() if v == c) for c in chans}
        raise ValueError(
            f"{root}: images have different channel counts: "
            + ", ".join(f"{c} (case {ex[c]!r})" for c in chans)
        )
    distinct = sorted(set(sizes.values()))
    if spatial_size is not None:
        if dims is not None and len(spatial_size) != dims:
            raise ValueError(
                f"spatial_size (--spatial-size) {list(spatial_size)} has "
                f"{len(spatial_size)} entries but the data are {dims}D"
            )
    elif len(distinct) > 1:
        listing = "; ".join(
            f"{cid}: {'x'.join(map(str, s))}" for cid, s in list(sizes.items())[:12]
        )
        more = f" (and {len(sizes) - 12} more)" if len(sizes) > 12 else ""
        raise ValueError(
            f"the cases of {root} differ in size ({len(distinct)} sizes: {listing}{more}); "
            f"give --spatial-size (e.g. --spatial-size "
            f"{','.join(map(str, distinct[0]))}) to resize every case to one size"
        )
    return ScanResult(
        ids=ids, spatial_dims=dims, in_channels=chans[0] if chans else None, sizes=sizes
    )
