"""``python -m sotto.server``: the same as the ``sotto-server`` console script."""

from sotto.server.cli import main

raise SystemExit(main())
