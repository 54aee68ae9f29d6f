"""`python -m deferredseg ...` is the `deferredseg` command."""

from .cli import main

raise SystemExit(main())
