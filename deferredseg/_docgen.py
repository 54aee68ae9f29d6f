"""Generated parts of the docs: a part is the text between two marker lines.

    <!-- generated: NAME (do not edit; see the command below) -->
    ...
    <!-- end generated: NAME -->

:func:`update_section` replaces what lies between the markers with a body that code
writes (the option tables of docs/configuration.md, the layouts of docs/data.md);
the tests compare the two, so a declaration changed without its docs is found.
Standard library only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Tuple

__all__ = ["section", "update_section", "doc_command"]


def _markers(name: str) -> Tuple[str, str]:
    return f"<!-- generated: {name} ", f"<!-- end generated: {name} -->"


def section(text: str, name: str) -> str:
    """The body between ``name``'s markers in ``text`` (ValueError if they are missing)."""
    begin, end = _markers(name)
    start = text.find(begin)
    stop = text.find(end)
    if start < 0 or stop < start:
        raise ValueError(
            f"no generated section {name!r}: expected a line starting with {begin.strip()!r} "
            f"and a later line {end!r}"
        )
    body_start = text.index("\n", start) + 1
    return text[body_start:stop].strip("\n")


def update_section(path: Path, name: str, body: str, write: bool = True) -> bool:
    """Put ``body`` between ``name``'s markers in the file ``path``; returns whether it
    differed (``write=False``: only compare)."""
    path = Path(path)
    text = path.read_text()
    if section(text, name) == body.strip("\n"):
        return False
    if write:
        begin, end = _markers(name)
        start = text.find(begin)
        body_start = text.index("\n", start) + 1
        stop = text.find(end)
        path.write_text(text[:body_start] + "\n" + body.strip("\n") + "\n\n" + text[stop:])
    return True


def doc_command(
    prog: str,
    description: str,
    name: str,
    render: Callable[[], str],
    what: str,
    argv: Optional[List[str]] = None,
) -> int:
    """The command line of a generated part: ``prog --write-doc FILE`` puts ``render()``
    between ``name``'s markers in FILE; ``prog --check FILE`` exits 1 if it differs.
    ``what`` names the part in messages ("the option tables")."""
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--write-doc", metavar="FILE", help=f"the file whose {what} to update")
    p.add_argument("--check", metavar="FILE", help=f"exit 1 if FILE's {what} are stale")
    args = p.parse_args(argv)
    if not (args.write_doc or args.check):
        p.error("give --write-doc FILE or --check FILE")
    path = Path(args.write_doc or args.check)
    changed = update_section(path, name, render(), write=bool(args.write_doc))
    if args.check and changed:
        print(f"{path}: {what} are not current; run {prog} --write-doc {path}")
        return 1
    print(f"{path}: {'updated' if changed else 'current'}")
    return 0
