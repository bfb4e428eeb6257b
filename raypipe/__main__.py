from raypipe.cli import main

raise SystemExit(main())
