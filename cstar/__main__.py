"""`python -m cstar` is the same as the `cstar` console script."""

from cstar.cli import main

raise SystemExit(main())
