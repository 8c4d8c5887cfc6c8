"""``python -m rmt_kernels.audit``: the ``rmt-audit`` command."""

from rmt_kernels.audit.cli import main

raise SystemExit(main())
