"""New images in, results out in the same format: what ``deferredseg predict`` reads and
writes, and what the review server and ``deferredseg merge`` read back.

- :func:`load_input`: one image of any supported format (PNG, ``.npy``, NIfTI; 2D or
  3D) as a float32 channel-first array, with its :class:`InputMeta` (format, NIfTI
  affine and header);
- :func:`write_like` / :func:`read_like`: an array written in (and read back from) the
  format of its input, atomically;
- :func:`file_fingerprint`: what identifies a file's version (size and modification time;
  from :mod:`deferredseg.fileio`, where the atomic writers are).
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Tuple, Union

import numpy as np

from ..fileio import atomic_write_bytes, file_fingerprint
from .io import _reader, split_name

__all__ = ["InputMeta", "load_input", "write_like", "read_like", "file_fingerprint"]


@dataclass
class InputMeta:
    """What is needed to write an output in the input's format."""

    ext: str
    affine: Optional[np.ndarray] = None  # NIfTI only
    header: Any = None  # NIfTI only


def load_input(
    path: Union[str, Path], in_channels: int, spatial_dims: int
) -> Tuple[np.ndarray, InputMeta]:
    """An image file as ``(C, *S)`` float32 (raw intensities) and its format metadata.

    PNG and NIfTI files are read with MONAI's readers (``PILReader``,
    ``NibabelReader``), ``.npy`` with ``numpy.load(allow_pickle=False)``. A colour
    PNG given to a one-channel model is read as its grey level.
    """
    path = Path(path)
    parts = split_name(path.name)
    if parts is None:
        raise ValueError(f"{path}: unsupported file type; expected .png, .npy, .nii or .nii.gz")
    ext = parts[1]
    meta = InputMeta(ext=ext)
    try:
        if ext == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            reader = _reader(ext)
            obj = reader.read(str(path))
            if ext in (".nii", ".nii.gz"):
                meta.affine = np.asarray(obj.affine)
                meta.header = obj.header.copy()
            arr, _ = reader.get_data(obj)
            arr = np.asarray(arr)
    except Exception as err:
        raise ValueError(f"cannot read image {path}: {type(err).__name__}: {err}") from err
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "biuf":
        raise ValueError(
            f"image {path}: expected a numeric array, got dtype {getattr(arr, 'dtype', None)}"
        )
    arr = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"image {path} contains NaN or infinite values")
    sd, C = int(spatial_dims), int(in_channels)
    if arr.ndim == sd:
        x = arr[None]
    elif arr.ndim == sd + 1:
        if ext == ".png" and arr.shape[-1] in (3, 4) and C == 1:
            x = arr[..., :3].mean(axis=-1)[None]
        elif ext != ".png" and arr.shape[0] == C:
            x = arr
        elif arr.shape[-1] == C:
            x = np.moveaxis(arr, -1, 0)
        else:
            raise ValueError(
                f"image {path} has shape {arr.shape}; the model takes {C} channel(s) of "
                f"{sd}D images: expected (*S), ({C}, *S) or (*S, {C})"
            )
    else:
        raise ValueError(
            f"image {path} has shape {arr.shape}; the model takes {sd}D images with "
            f"{C} channel(s): expected {sd} or {sd + 1} axes"
        )
    if x.shape[0] != C:
        raise ValueError(f"image {path} has {x.shape[0]} channel(s), the model takes {C}")
    if min(x.shape[1:]) < 1:
        raise ValueError(f"image {path} is empty (shape {arr.shape})")
    return np.ascontiguousarray(x), meta


def _encode(arr: np.ndarray, meta: InputMeta) -> bytes:
    if meta.ext == ".npy":
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
        return buf.getvalue()
    if meta.ext == ".png":
        from PIL import Image

        if arr.ndim != 2:
            raise ValueError(f"PNG holds 2D images only, got an array of shape {arr.shape}")
        if arr.dtype.kind == "f":
            arr = np.clip(np.rint(arr * 255.0), 0, 255)
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8))).save(buf, format="PNG")
        return buf.getvalue()
    import nibabel as nib

    header = meta.header.copy() if meta.header is not None else None
    img = nib.Nifti1Image(
        np.ascontiguousarray(arr),
        meta.affine if meta.affine is not None else np.eye(4),
        header=header,
    )
    img.set_data_dtype(arr.dtype)
    if header is not None:
        img.header.set_slope_inter(1.0, 0.0)
    data = img.to_bytes()
    return gzip.compress(data, compresslevel=4, mtime=0) if meta.ext == ".nii.gz" else data


def write_like(path_stem: Union[str, Path], arr: np.ndarray, meta: InputMeta) -> Path:
    """Write ``arr`` (*S) as ``path_stem + meta.ext``, atomically; returns the path.

    Label maps should be uint8, probabilities float32 (PNG scales them to 0..255).
    """
    path = Path(str(path_stem) + meta.ext)
    atomic_write_bytes(path, _encode(arr, meta))
    return path


def read_like(path: Union[str, Path]) -> Tuple[np.ndarray, InputMeta]:
    """An output written by :func:`write_like`, as an array, and its format metadata."""
    path = Path(path)
    parts = split_name(path.name)
    if parts is None:
        raise ValueError(f"{path}: unsupported file type")
    meta = InputMeta(ext=parts[1])
    if meta.ext == ".npy":
        return np.load(path, allow_pickle=False), meta
    reader = _reader(meta.ext)
    obj = reader.read(str(path))
    if meta.ext != ".png":
        meta.affine = np.asarray(obj.affine)
        meta.header = obj.header.copy()
        return np.asarray(obj.dataobj), meta
    arr, _ = reader.get_data(obj)
    return np.asarray(arr), meta
