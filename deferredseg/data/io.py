"""Reading images and label maps (png, npy, nii / nii.gz) with clear errors.

PNG and NIfTI files are read with MONAI's image readers (``PILReader`` with
``reverse_indexing=False``, so a PNG array is (H, W[, C]) as in PIL / numpy;
``NibabelReader``, the array in the file's voxel order); ``.npy`` with
``numpy.load(allow_pickle=False)``. Every error names the file and says what
was expected.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Tuple, Union

import numpy as np

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "split_name",
    "read_array",
    "read_image",
    "read_label",
    "to_channel_first",
    "convert_labels",
    "voxel_spacing",
    "LabelMap",
]

#: File extensions understood by the readers, longest first.
SUPPORTED_EXTENSIONS: Tuple[str, ...] = (".nii.gz", ".nii", ".npy", ".png")

#: ``label_map``: None (0/255 binary masks become 0/1, other values are labels),
#: ``"binary"`` (every non-zero value is foreground 1) or a {raw value: label} dict.
LabelMap = Union[None, str, Mapping[int, int]]


def split_name(filename: str) -> Optional[Tuple[str, str]]:
    """``(id, ext)`` of a supported file name, None for other names."""
    low = filename.lower()
    for ext in SUPPORTED_EXTENSIONS:
        if low.endswith(ext) and len(filename) > len(ext):
            return filename[: -len(ext)], ext
    return None


def _reader(ext: str):
    from monai.data import NibabelReader, PILReader

    if ext == ".png":
        return PILReader(reverse_indexing=False)
    return NibabelReader()


def read_array(path: Union[str, os.PathLike], what: str = "file") -> np.ndarray:
    """The array stored in ``path`` (png, npy, nii, nii.gz).

    Raises FileNotFoundError when the file does not exist and ValueError, naming
    the file, when it cannot be read as the format its extension promises.
    """
    path = Path(path)
    parts = split_name(path.name)
    if parts is None:
        raise ValueError(
            f"{path}: unsupported file type; expected one of {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    ext = parts[1]
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    try:
        if ext == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            reader = _reader(ext)
            arr, _ = reader.get_data(reader.read(str(path)))
            arr = np.asarray(arr)
    except Exception as err:
        kind = {
            ".npy": "a NumPy .npy array (saved without pickling)",
            ".png": "a PNG image",
            ".nii": "a NIfTI image",
            ".nii.gz": "a gzipped NIfTI image",
        }[ext]
        raise ValueError(
            f"cannot read {what} {path}: expected {kind} ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "biuf":
        raise ValueError(
            f"{what} {path}: expected a numeric array, got dtype "
            f"{getattr(arr, 'dtype', type(arr).__name__)}"
        )
    return arr


def read_image(path, what: str = "image") -> np.ndarray:
    """An image array as float32 (channels not yet moved; see :func:`to_channel_first`)."""
    arr = read_array(path, what)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} {path} contains NaN or infinite values")
    return arr.astype(np.float32, copy=False)


def read_label(
    path, num_labels: int, label_map: LabelMap = None, ignore_index: int = -100, what: str = "label"
) -> np.ndarray:
    """A label map as int64 values in [0, num_labels) or ``ignore_index``
    (see :func:`convert_labels`).

    A PNG mask saved as RGB(A) with equal colour channels is read as one channel.
    """
    arr = read_array(path, what)
    if str(path).lower().endswith(".png") and arr.ndim == 3 and arr.shape[-1] in (3, 4):
        rgb = arr[..., :3]
        if not (
            np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
        ):
            raise ValueError(
                f"{what} {path} is a colour image whose channels differ; expected a "
                "single-channel mask (grey or palette PNG)"
            )
        arr = rgb[..., 0]
    return convert_labels(arr, num_labels, label_map, ignore_index, source=f"{what} {path}")


def convert_labels(
    arr: np.ndarray,
    num_labels: int,
    label_map: LabelMap = None,
    ignore_index: int = -100,
    source: str = "labels",
) -> np.ndarray:
    """Raw mask values to labels, checked.

    - ``label_map=None``: a mask whose values are all in {0, 255} (the common PNG
      encoding of a binary mask) becomes 0/1; any other values are taken as labels.
    - ``label_map="binary"``: every non-zero value is foreground (1).
    - ``label_map={raw: label}``: each raw value is mapped; a value missing from
      the map is an error. Labels may be ``ignore_index``.

    Every resulting value must lie in [0, num_labels) or equal ``ignore_index``.
    """
    arr = np.asarray(arr)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            bad = arr[~np.isfinite(arr) | (arr != np.round(arr))].ravel()[:5]
            raise ValueError(f"{source}: label values must be integers, found {bad.tolist()}")
    raw = arr.astype(np.int64)
    if label_map is None:
        values = np.unique(raw)
        if num_labels <= 255 and values.size and np.all(np.isin(values, (0, 255))):
            out = raw // 255
        else:
            out = raw
    elif isinstance(label_map, str):
        if label_map != "binary":
            raise ValueError(
                f"label_map must be None, 'binary' or a {{raw value: label}} dict, got "
                f"{label_map!r}"
            )
        out = (raw != 0).astype(np.int64)
    else:
        keys = np.array(sorted(int(k) for k in label_map), dtype=np.int64)
        vals = np.array([int(label_map[k]) for k in sorted(label_map, key=int)], dtype=np.int64)
        pos = np.searchsorted(keys, raw)
        pos_c = np.clip(pos, 0, max(len(keys) - 1, 0))
        known = (pos < len(keys)) & (keys[pos_c] == raw) if len(keys) else np.zeros(raw.shape, bool)
        if not np.all(known):
            unknown = np.unique(raw[~known])[:10]
            raise ValueError(
                f"{source}: values {unknown.tolist()} are not in label_map "
                f"(which maps {keys.tolist()})"
            )
        out = vals[pos_c]
    valid = out != ignore_index
    bad = np.unique(out[valid & ((out < 0) | (out >= num_labels))])
    if bad.size:
        raise ValueError(
            f"{source}: label values {bad[:10].tolist()} out of range; expected integers in "
            f"[0, {num_labels}) (or ignore_index={ignore_index}), binary masks saved as 0/255, "
            "or a label_map for other encodings (--label-map / the label_map key, e.g. 0:0,128:1)"
        )
    return out


def to_channel_first(
    image: np.ndarray, spatial_shape: Tuple[int, ...], image_path="image", label_path="label"
) -> np.ndarray:
    """An image (*S), (C, *S) or (*S, C) as (C, *S), given the label's spatial shape S."""
    S = tuple(int(s) for s in spatial_shape)
    shape = tuple(image.shape)
    if shape == S:
        return image[None]
    if image.ndim == len(S) + 1:
        if shape[1:] == S:
            return image
        if shape[:-1] == S:
            return np.moveaxis(image, -1, 0)
    raise ValueError(
        f"shape mismatch: image {image_path} has shape {shape} but {label_path} has shape {S}; "
        f"expected the image to be {S}, (C, *{S}) or (*{S}, C)"
    )


#: NIfTI spatial units (``xyzt_units``) in millimetres; "unknown" is read as mm, the
#: convention of medical images.
_MM_PER_UNIT = {"mm": 1.0, "meter": 1000.0, "micron": 0.001, "unknown": 1.0}


def voxel_spacing(path, ndim: int) -> Optional[np.ndarray]:
    """The physical size (mm) of a voxel along each of the first ``ndim`` axes of ``path``
    from its header (NIfTI ``pixdim`` and units); None for formats without one (PNG,
    ``.npy``) or a header without a usable spacing (zero or missing)."""
    parts = split_name(Path(path).name)
    if parts is None or parts[1] not in (".nii", ".nii.gz"):
        return None
    import nibabel

    header = nibabel.load(str(path)).header
    zooms = np.asarray(header.get_zooms()[:ndim], dtype=np.float64)
    if zooms.size != ndim or not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        return None
    unit = header.get_xyzt_units()[0] or "unknown"
    return zooms * _MM_PER_UNIT.get(unit, 1.0)
