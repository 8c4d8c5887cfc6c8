"""Compatibility name: the checks of every op live in :mod:`rmt_kernels._checks`."""

from rmt_kernels._checks import *  # noqa: F403
from rmt_kernels._checks import FLOAT_DTYPES, INT64_MAX  # noqa: F401
