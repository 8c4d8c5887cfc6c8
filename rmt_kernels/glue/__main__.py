"""``python -m rmt_kernels.glue``: the same as the ``rmt-glue`` command."""

import sys

from rmt_kernels.glue.cli import main

sys.exit(main())
