"""`python -m atofx`: the same command line as the `atofx` script."""

from atofx.cli import main

raise SystemExit(main())
