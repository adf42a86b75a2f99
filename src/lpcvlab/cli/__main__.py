"""``python -m lpcvlab.cli``: the same entry point as the ``lpcvlab`` command."""

import sys

from lpcvlab.cli import main

sys.exit(main())
