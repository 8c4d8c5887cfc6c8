"""``python -m rmt_kernels.lm``: the same as the ``rmt-lm`` command."""

import sys

from rmt_kernels.lm.cli import main

sys.exit(main())
