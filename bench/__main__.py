"""Entry point of ``python -m bench``; everything lives in ``bench.cli``."""

from bench.cli import main

raise SystemExit(main())
