"""``python -m telematics_cli``: the same as the ``telematics-reg`` console script."""

from __future__ import annotations

from telematics_cli.app import main

raise SystemExit(main())
