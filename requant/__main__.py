"""``python -m requant`` is the ``requant`` command."""

import sys

from requant.cli import main

sys.exit(main())
