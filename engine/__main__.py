"""``python -m engine`` is the ``queue-engine`` command."""

from engine.cli import main

raise SystemExit(main())
