"""GLUE fine-tuning with DP-SGD: task specs and metrics (tasks), data (data), the training loop
(train), the ``rmt-glue`` command (cli) and plots comparing runs (compare)."""

from rmt_kernels.glue.tasks import TASKS, Task, get_task

__all__ = ["TASKS", "Task", "get_task"]
