"""``python -m migrator``: the command line (:func:`migrator.cli.main`)."""

import sys

from .cli import main

sys.exit(main())
