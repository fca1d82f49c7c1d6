"""`python -m atofx`: the same command line as the `atofx` script."""

from atofx.app.cli import main

raise SystemExit(main())
