"""``python -m fedmerge``: the ``fedmerge`` command."""

import sys

from fedmerge.federation.cli import main

sys.exit(main())
