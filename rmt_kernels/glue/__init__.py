"""GLUE fine-tuning with DP-SGD, the ``rmt-glue`` command: one application of the shared
training core (``rmt_kernels.training``).

One idea a module: the command (cli); its options on top of the core's (config: ``GlueConfig``);
task specs and metrics (tasks); data (data); the classifier and its loss (model, pooling);
evaluation (evaluation); the task the core's loop trains (fine_tune: ``GlueFineTuning``,
``train``); the probe of the gradient's signal against the noise (probe, with probe_spectra,
probe_gradient, probe_report).
"""

from rmt_kernels.glue.tasks import TASKS, Task, get_task

__all__ = ["TASKS", "Task", "get_task"]
