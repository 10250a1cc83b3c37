from sotto.edge.cli import main

raise SystemExit(main())
