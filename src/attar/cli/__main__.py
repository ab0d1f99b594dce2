"""``python -m attar.cli`` (torchrun, tests): the ``attar`` command."""

import sys

from attar.cli import main

sys.exit(main())
