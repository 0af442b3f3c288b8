"""``python -m sslprobe``: the same as the ``sslprobe`` command."""

from sslprobe.cli.main import main

raise SystemExit(main())
