"""``python -m fastad``: the same as the ``fastad`` command."""

import sys

from .cli import main

sys.exit(main())
