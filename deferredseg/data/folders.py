"""The folders of the file layouts: which case files a dataset folder holds.

:func:`scan_multirater` and :func:`scan_medsam_npy` list the cases of the
``multirater`` and ``medsam-npy`` layouts (docs/data.md), refusing folders whose
files do not match; they read no file contents (``deferredseg.data.scan`` does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .io import SUPPORTED_EXTENSIONS, split_name

__all__ = ["scan_multirater", "scan_medsam_npy"]


def _list_folder(
    folder: Path, what: str, layout: str, extensions: Sequence[str] = SUPPORTED_EXTENSIONS
) -> Dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{what} folder {folder} not found (layout {layout!r}; see docs/data.md)"
        )
    files: Dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue  # hidden files (.DS_Store, ...)
        if p.is_dir():
            raise ValueError(
                f"unexpected folder {p} in the {what} folder; expected files <id>"
                f"{'|'.join(extensions)}"
            )
        parts = split_name(p.name)
        if parts is None or parts[1] not in extensions:
            raise ValueError(
                f"{p}: unsupported file in the {what} folder; expected <id> with extension "
                f"{' or '.join(extensions)}"
            )
        case_id = parts[0]
        if case_id in files:
            raise ValueError(f"{p} and {files[case_id]} have the same id {case_id!r}")
        files[case_id] = p
    if not files:
        raise FileNotFoundError(f"{what} folder {folder} holds no {' / '.join(extensions)} files")
    return files


def _match(
    ref: Dict[str, Path], ref_folder: Path, other: Dict[str, Path], other_folder: Path, what: str
) -> None:
    missing = sorted(set(ref) - set(other))
    if missing:
        raise ValueError(
            f"{what} folder {other_folder} has no file for {ref[missing[0]]} "
            f"(expected {other_folder / missing[0]}.<ext>); {len(missing)} unmatched in all: "
            f"{missing[:10]}"
        )
    extra = sorted(set(other) - set(ref))
    if extra:
        raise ValueError(
            f"{other[extra[0]]} matches no file in {ref_folder} (file names must be the same "
            f"apart from the extension); {len(extra)} unmatched in all: {extra[:10]}"
        )


def scan_multirater(
    root, raters: Optional[Sequence[str]] = None
) -> Tuple[List[Dict[str, Any]], List[str], bool]:
    """Cases of the ``multirater`` layout: ``images/<id>.<ext>``, ``raters/<rater>/<id>.<ext>``,
    optional ``labels/<id>.<ext>``.

    Returns (cases, rater names, has labels). Every rater folder must hold a file
    for every image and no other.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} not found")
    images = _list_folder(root / "images", "images", "multirater")
    rater_root = root / "raters"
    if not rater_root.is_dir():
        raise FileNotFoundError(
            f"raters folder {rater_root} not found (layout 'multirater' expects "
            "raters/<rater>/<id>.<ext>)"
        )
    names = sorted(
        p.name for p in rater_root.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    if not names:
        raise FileNotFoundError(
            f"raters folder {rater_root} holds no rater folders raters/<rater>/"
        )
    if raters is not None:
        unknown = [r for r in raters if r not in names]
        if unknown:
            raise ValueError(f"raters {unknown} not found in {rater_root}; rater folders: {names}")
    per_rater = {}
    for name in names:
        files = _list_folder(rater_root / name, f"rater {name!r}", "multirater")
        _match(images, root / "images", files, rater_root / name, f"rater {name!r}")
        per_rater[name] = files
    labels = None
    if (root / "labels").exists():
        labels = _list_folder(root / "labels", "labels", "multirater")
        _match(images, root / "images", labels, root / "labels", "labels")
    cases = []
    for case_id in sorted(images):
        cases.append(
            {
                "id": case_id,
                "image": str(images[case_id]),
                "label": str(labels[case_id]) if labels is not None else None,
                "raters": [str(per_rater[n][case_id]) for n in names],
                "rater_names": list(names),
            }
        )
    return cases, names, labels is not None


def scan_medsam_npy(root) -> List[Dict[str, Any]]:
    """Cases of the ``medsam-npy`` layout: ``imgs/<id>.npy`` images and ``gts/<id>.npy`` labels."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} not found")
    imgs = _list_folder(root / "imgs", "imgs", "medsam-npy", (".npy",))
    gts = _list_folder(root / "gts", "gts", "medsam-npy", (".npy",))
    _match(imgs, root / "imgs", gts, root / "gts", "gts")
    return [{"id": i, "image": str(imgs[i]), "label": str(gts[i])} for i in sorted(imgs)]
