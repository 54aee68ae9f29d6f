"""The data layouts: one :class:`Layout` record each, so that adding a layout touches one place.

A record says everything the package needs to know about a layout: how its cases
are found (``scan``), whether they are read from a dataset folder (then ``--data``
is needed and :func:`deferredseg.data.scan.scan_dataset` reads every file before
training), who the experts are (its rater folders, or simulated experts of a
profile, ``default_profile`` when none is given) and the line that describes it in
``deferredseg train --help`` and docs/data.md. :data:`LAYOUTS` (the values of the
``layout`` option), :func:`deferredseg.data.build_dataset`, the training
configuration, its data checks and the command line read this registry.

This module imports neither torch nor MONAI: the command line's option list reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

__all__ = ["Layout", "FoundCases", "REGISTRY", "LAYOUTS", "FILE_LAYOUTS", "get_layout"]


class FoundCases(NamedTuple):
    """What a layout's ``scan`` finds: the cases (dicts with an ``id`` and, for file
    layouts, the file paths), the rater names (empty for simulated experts) and
    whether the cases carry a reference label."""

    cases: List[Dict[str, Any]]
    rater_names: List[str]
    has_label: bool


@dataclass(frozen=True)
class Layout:
    """One data layout.

    ``scan(root, raters=None, num_images=...)`` lists its cases as :class:`FoundCases`
    (``raters``: the rater folders to check for, ``num_images``: the number of generated
    cases). ``files``: the cases are files in a dataset folder (``--data``), checked in
    full before training. ``raters``: its experts are its rater folders; otherwise
    they are simulated, from ``default_profile`` unless the configuration names a
    profile. ``generate(ids, **options)``: for a layout without files, the cases of
    the chosen ids (after the split). ``summary``: what the layout reads, for the help
    and the docs.
    """

    name: str
    summary: str
    scan: Callable[..., FoundCases]
    files: bool
    raters: bool = False
    default_profile: Optional[str] = None
    generate: Optional[Callable[..., List[Dict[str, Any]]]] = None

    @property
    def default_target(self) -> str:
        """The training target when none is given: the raters' majority, else the label."""
        return "majority" if self.raters else "label"


def _scan_synthetic(root=None, raters=None, num_images: int = 24, **_: Any) -> FoundCases:
    return FoundCases([{"id": f"case_{i:04d}"} for i in range(int(num_images))], [], True)


def _generate_synthetic(ids: Sequence[str], **options: Any) -> List[Dict[str, Any]]:
    from .synthetic import synthetic_cases

    return synthetic_cases(ids, **options)


def _scan_multirater(root, raters=None, **_: Any) -> FoundCases:
    from .folders import scan_multirater

    return FoundCases(*scan_multirater(root, raters))


def _scan_medsam_npy(root, raters=None, **_: Any) -> FoundCases:
    from .folders import scan_medsam_npy

    return FoundCases(scan_medsam_npy(root), [], True)


#: The layouts by name, in the order the help and the docs list them.
REGISTRY: Dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout(
            "synthetic",
            "generated, no files",
            scan=_scan_synthetic,
            files=False,
            default_profile="structured",
            generate=_generate_synthetic,
        ),
        Layout(
            "multirater",
            "images/, raters/<rater>/, optional labels/",
            scan=_scan_multirater,
            files=True,
            raters=True,
        ),
        Layout(
            "medsam-npy",
            "imgs/, gts/",
            scan=_scan_medsam_npy,
            files=True,
            default_profile="same-accuracy",
        ),
    )
}

LAYOUTS = tuple(REGISTRY)  # the values of the ``layout`` option
FILE_LAYOUTS = tuple(name for name, layout in REGISTRY.items() if layout.files)


def get_layout(name: str) -> Layout:
    """The record of layout ``name``; ValueError naming the known ones otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {name!r}") from None


def layouts_help() -> str:
    """The layouts in one line: ``name (what it reads), ...``."""
    return ", ".join(f"{layout.name} ({layout.summary})" for layout in REGISTRY.values())


def layouts_markdown() -> str:
    """The table of layouts in docs/data.md."""
    rows = [
        "| layout | reads | dataset folder (`--data`) | experts |",
        "|---|---|---|---|",
    ]
    for layout in REGISTRY.values():
        experts = (
            "its rater folders"
            if layout.raters
            else f"simulated (default profile `{layout.default_profile}`)"
        )
        rows.append(
            f"| `{layout.name}` | {layout.summary} | {'yes' if layout.files else 'no'} "
            f"| {experts} |"
        )
    return "\n".join(rows)


DOC_SECTION = "layouts"  # the generated part of docs/data.md


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m deferredseg.data.layouts --write-doc docs/data.md`` regenerates the table
    of layouts in that file (``--check`` instead: exit 1 if it is not current)."""
    from .._docgen import doc_command

    return doc_command(
        "python -m deferredseg.data.layouts",
        str(main.__doc__),
        DOC_SECTION,
        layouts_markdown,
        "the table of layouts",
        argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())
