"""``python -m server``: the same as the ``sotto-server`` console script."""

from server.cli import main

raise SystemExit(main())
