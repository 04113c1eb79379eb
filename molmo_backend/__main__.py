from molmo_backend.commands.cli import main

raise SystemExit(main())
