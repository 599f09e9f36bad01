"""``python -m autonorm.cli``: the ``autonorm`` command (the worker pool starts its workers so)."""

from autonorm.cli import main

raise SystemExit(main())
