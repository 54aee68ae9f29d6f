"""A full check of every file of a dataset before training: headers and contents.

:func:`scan_dataset` lists the cases of a file layout (``multirater``,
``medsam-npy``: the layouts of :mod:`deferredseg.data.layouts` with files) and
reads every image and mask of every split (in parallel threads: the PNG, zlib and
NumPy work releases the GIL), so that a bad file is reported before the first step
instead of after training. It checks

- that each file can be read (PNG, NIfTI, ``.npy``);
- mask values: integers that the label map (``--label-map``, per folder if
  asked) turns into labels in ``[0, num_labels)``, and single-channel masks (an
  RGB mask whose colour channels differ is refused);
- images: no NaN or infinite values, the same channel count in every case;
- shapes: a case's masks and image fit each other; cases of different sizes
  without ``--spatial-size`` (the sizes are listed with their case counts, so
  the odd case is visible); a mix of 2D and 3D files.

Every problem is collected first and then reported in one error, grouped by
kind, naming every offending file (the first 20 of each kind and a count of
the rest) with its case and split. It also infers the spatial dimensions
(2 or 3) from the masks. ``contents=False`` reads the headers only.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .io import convert_labels, split_name

__all__ = [
    "ScanResult",
    "FolderLabelMap",
    "scan_dataset",
    "file_shape",
    "parse_label_map",
    "split_sizes",
]

#: Fewer validation or test cases than this get a warning.
FEW_CASES = 5
#: Offending files named per kind of error (the rest are counted).
SHOW_PER_KIND = 20
#: The folders a per-folder label map can name (``gts`` is medsam-npy's label folder).
LABEL_FOLDERS = ("labels", "gts", "raters")


@dataclass
class ScanResult:
    ids: List[str]
    spatial_dims: Optional[int]
    in_channels: Optional[int]
    sizes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)  # id -> spatial shape


@dataclass(frozen=True)
class FolderLabelMap:
    """A label map per mask folder: ``labels`` (also medsam-npy's ``gts``) and ``raters``;
    each None, ``"binary"`` or a {raw: label} dict."""

    labels: Any = None
    raters: Any = None

    def for_kind(self, kind: str):
        return self.raters if kind == "raters" else self.labels


def _parse_one(text: str, whole: str):
    text = text.strip()
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
                f"0:0,128:1, optionally per folder such as raters:0:0,128:1;labels:binary, "
                f"got {whole!r}"
            ) from None
    if not out:
        raise ValueError(f"label_map (--label-map): no raw:label pairs in {whole!r}")
    return out


def parse_label_map(value: Union[None, str, Dict[Any, Any]]):
    """``--label-map``: None, ``"binary"``, ``"0:0,128:1"``, a mapping, or maps per folder
    separated by ``;`` (``"raters:0:0,128:1;labels:binary"``; a folder not named keeps the
    default reading, a map without a folder applies to every folder) -> what the readers
    take (a :class:`FolderLabelMap` when folders are named)."""
    if value is None or isinstance(value, dict):
        return None if value is None else {int(k): int(v) for k, v in value.items()}
    text = str(value).strip()
    groups = [g.strip() for g in text.split(";") if g.strip()]
    if not groups:
        raise ValueError(f"label_map (--label-map): no raw:label pairs in {value!r}")
    per: Dict[str, Any] = {}
    common: Any = None
    for g in groups:
        folder, sep, rest = g.partition(":")
        if sep and folder.strip() in LABEL_FOLDERS:
            key = "raters" if folder.strip() == "raters" else "labels"
            if key in per:
                raise ValueError(
                    f"label_map (--label-map): folder {folder.strip()!r} is given twice in "
                    f"{value!r}"
                )
            per[key] = _parse_one(rest, text)
        elif sep and not folder.strip().lstrip("-").isdigit():
            raise ValueError(
                f"label_map (--label-map): unknown folder {folder.strip()!r} in {value!r}; "
                f"expected one of {list(LABEL_FOLDERS)} (e.g. raters:0:0,128:1)"
            )
        else:
            if common is not None:
                raise ValueError(
                    f"label_map (--label-map): two maps without a folder in {value!r}; name "
                    f"the folder of each (e.g. raters:0:0,128:1;labels:binary)"
                )
            common = _parse_one(g, text)
    if not per:
        return common
    return FolderLabelMap(labels=per.get("labels", common), raters=per.get("raters", common))


def label_map_for(label_map, kind: str):
    """The map of one mask folder (``kind``: "labels" or "raters")."""
    return label_map.for_kind(kind) if isinstance(label_map, FolderLabelMap) else label_map


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


# ----------------------------------------------------------------------------- the scan

#: The kinds of problem, in the order they are reported, with what to do about each.
KINDS = {
    "unreadable": "files that cannot be read: fix or remove them",
    "mask values": "mask values that are not labels: give --label-map (per folder if the "
    "folders differ, e.g. raters:0:0,128:1) or fix the masks",
    "colour masks": "colour masks whose channels differ: save them as single-channel "
    "(grey or palette) masks",
    "non-finite images": "images with NaN or infinite values: fix or remove them",
    "shape mismatch": "files whose shape does not fit the rest of their case: the masks of "
    "a case must have one shape, the image that shape, (C, *shape) or (*shape, C)",
}


def _read(path: str) -> np.ndarray:
    """The whole array of ``path``, read the quick way (raises on any reader error)."""
    ext = (split_name(Path(path).name) or ("", ""))[1]
    if ext == ".png":
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im)
    if ext == ".npy":
        return np.load(path, allow_pickle=False)
    if ext in (".nii", ".nii.gz"):
        import nibabel

        return np.asanyarray(nibabel.load(str(path)).dataobj)
    raise ValueError("unsupported file type")


def _mask_values(path: str, arr: np.ndarray):
    """(single-channel mask, None) or (None, the problem's kind and text)."""
    if path.lower().endswith(".png") and arr.ndim == 3 and arr.shape[-1] in (3, 4):
        rgb = arr[..., :3]
        if not (
            np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
        ):
            return None, ("colour masks", f"{arr.shape[-1]} channels that differ")
        arr = rgb[..., 0]
    return arr, None


def _unique(arr: np.ndarray) -> np.ndarray:
    if arr.dtype in (np.uint8, np.uint16):  # a histogram is much faster than a sort
        return np.flatnonzero(np.bincount(arr.ravel(), minlength=1))
    return np.unique(arr)


def _check_case(case: Dict[str, Any], split: str, opts: Dict[str, Any]):
    """Check one case's files: (spatial shape, image channels, [(kind, line), ...])."""
    problems: List[Tuple[str, str]] = []
    ctx = f"(case {case['id']!r}, {split} split)"
    contents = opts["contents"]
    masks = [("labels", case["label"])] if case.get("label") else []
    masks += [("raters", r) for r in case.get("raters") or []]
    S = ref = None
    for kind, m in masks:
        try:
            if contents:
                raw = _read(m)
                arr, bad = _mask_values(m, raw)
                if bad is not None:
                    problems.append((bad[0], f"{m} {ctx}: {bad[1]}"))
                    shape = tuple(raw.shape[:2])
                else:
                    shape = tuple(arr.shape)
                    values = _unique(arr)
                    try:
                        convert_labels(
                            values,
                            opts["num_labels"],
                            label_map_for(opts["label_map"], kind),
                            opts["ignore_index"],
                            source="",
                        )
                    except ValueError as exc:
                        shown = values[:8].tolist()
                        more = f" (and {values.size - 8} more)" if values.size > 8 else ""
                        why = str(exc).lstrip(": ").split("; expected")[0]
                        problems.append(("mask values", f"{m} {ctx}: values {shown}{more}: {why}"))
            else:
                shape = _mask_shape(m)
        except Exception as exc:  # noqa: BLE001 (any reader error is a bad file)
            problems.append(("unreadable", f"{m} {ctx}: cannot read ({type(exc).__name__}: {exc})"))
            continue
        if S is None:
            S, ref = shape, m
        elif shape != S:
            problems.append(
                ("shape mismatch", f"{m} {ctx}: shape {shape}, but {ref} has shape {S}")
            )
    img_path = case["image"]
    try:
        if contents:
            img = _read(img_path)
            if img.dtype.kind not in "biuf":
                raise ValueError(f"expected a numeric array, got dtype {img.dtype}")
            if img.dtype.kind == "f" and not np.isfinite(img).all():
                n = int(img.size - np.isfinite(img).sum())
                problems.append(
                    ("non-finite images", f"{img_path} {ctx}: {n} NaN or infinite values")
                )
            img_shape = tuple(img.shape)
        else:
            img_shape = file_shape(img_path)
    except Exception as exc:  # noqa: BLE001
        problems.append(
            ("unreadable", f"{img_path} {ctx}: cannot read ({type(exc).__name__}: {exc})")
        )
        return S, None, problems
    ch = _image_channels(img_shape, S) if S is not None else None
    if S is not None and ch is None:
        problems.append(
            (
                "shape mismatch",
                f"image {img_path} {ctx}: shape {img_shape}, but {ref} has shape {S}",
            )
        )
    return S, ch, problems


def _report(root, problems: List[Tuple[str, str]]) -> str:
    by_kind: Dict[str, List[str]] = {}
    for kind, line in problems:
        by_kind.setdefault(kind, []).append(line)
    parts = [f"the data in {root} have problems ({len(problems)} in all), found before training:"]
    for kind in [k for k in KINDS if k in by_kind] + [k for k in by_kind if k not in KINDS]:
        lines = sorted(by_kind[kind])
        parts.append(f"{KINDS.get(kind, kind)} ({len(lines)} file{'s' * (len(lines) != 1)}):")
        parts += [f"  {line}" for line in lines[:SHOW_PER_KIND]]
        if len(lines) > SHOW_PER_KIND:
            parts.append(f"  ... and {len(lines) - SHOW_PER_KIND} more")
    return "\n".join(parts)


def _sizes_listing(sizes: Dict[str, Tuple[int, ...]]) -> str:
    """``24x24: 10 cases; 28x20: 1 case (c10)``: the most common size first, the cases of
    the others named (the first 20 of each)."""
    counts = sorted(Counter(sizes.values()).items(), key=lambda kv: (-kv[1], kv[0]))
    out = []
    for i, (shape, n) in enumerate(counts):
        text = f"{'x'.join(map(str, shape))}: {n} case{'s' * (n != 1)}"
        if i > 0:
            ids = sorted(c for c, s in sizes.items() if s == shape)
            more = f" and {len(ids) - SHOW_PER_KIND} more" if len(ids) > SHOW_PER_KIND else ""
            text += f" ({', '.join(ids[:SHOW_PER_KIND])}{more})"
        out.append(text)
    return "; ".join(out)


def scan_dataset(
    layout: str,
    root,
    spatial_size: Optional[Sequence[int]] = None,
    split_file=None,
    seed: int = 0,
    splits: Optional[Sequence[str]] = None,
    contents: bool = True,
    num_labels: int = 2,
    label_map=None,
    ignore_index: int = -100,
    workers: Optional[int] = None,
) -> ScanResult:
    """Check every file of every case of ``root`` (only cases of ``splits`` when given).

    ``contents``: read the whole files (values, NaN, colour masks), else the headers
    only; ``label_map`` as :func:`parse_label_map` returns it; ``workers``: threads
    (default: the CPU count, at most 8). Raises ValueError listing every problem by
    kind; returns the case ids, the spatial dims and the image channels.
    """
    from .layouts import FILE_LAYOUTS, get_layout

    if layout not in FILE_LAYOUTS:
        raise ValueError(f"scan_dataset reads file layouts {list(FILE_LAYOUTS)}, got {layout!r}")
    cases = get_layout(layout).scan(root).cases
    ids = [c["id"] for c in cases]
    where = _split_of(ids, split_file, seed)
    if splits is not None:
        cases = [c for c in cases if where.get(c["id"]) in splits or "all" in splits]
    opts = dict(
        contents=contents,
        num_labels=max(int(num_labels), 2),
        label_map=label_map,
        ignore_index=ignore_index,
    )
    n_threads = workers or min(os.cpu_count() or 1, 8)

    def one(case):
        return _check_case(case, where.get(case["id"], "no"), opts)

    if n_threads > 1 and len(cases) > 8:
        with ThreadPoolExecutor(n_threads) as pool:
            results = list(_progress(pool.map(one, cases), len(cases)))
    else:
        results = [one(c) for c in _progress(cases, len(cases))]
    problems: List[Tuple[str, str]] = []
    sizes: Dict[str, Tuple[int, ...]] = {}
    channels: Dict[str, int] = {}
    first: Dict[int, str] = {}
    for case, (S, ch, probs) in zip(cases, results):
        problems += probs
        if S is not None and ch is not None:
            sizes[case["id"]], channels[case["id"]] = S, ch
            first.setdefault(len(S), case["image"])
    if problems:
        raise ValueError(_report(root, problems))
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
        counts = Counter(channels.values())
        listing = "; ".join(
            f"{c} channel{'s' * (c != 1)}: {n} case{'s' * (n != 1)}"
            + (
                ""
                if i == 0
                else f" ({', '.join(sorted(k for k, v in channels.items() if v == c)[:20])})"
            )
            for i, (c, n) in enumerate(counts.most_common())
        )
        raise ValueError(f"{root}: images have different channel counts: {listing}")
    distinct = sorted(set(sizes.values()))
    if spatial_size is not None:
        if dims is not None and len(spatial_size) != dims:
            raise ValueError(
                f"spatial_size (--spatial-size) {list(spatial_size)} has "
                f"{len(spatial_size)} entries but the data are {dims}D"
            )
    elif len(distinct) > 1:
        common = Counter(sizes.values()).most_common(1)[0][0]
        raise ValueError(
            f"the cases of {root} differ in size ({len(distinct)} sizes: "
            f"{_sizes_listing(sizes)}); give --spatial-size (e.g. --spatial-size "
            f"{','.join(map(str, common))}) to resize every case to one size"
        )
    return ScanResult(
        ids=ids, spatial_dims=dims, in_channels=chans[0] if chans else None, sizes=sizes
    )
