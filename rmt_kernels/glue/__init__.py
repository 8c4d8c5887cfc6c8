"""GLUE fine-tuning with DP-SGD, the ``rmt-glue`` command.

One idea a module: the command (cli); its options (config); task specs and metrics (tasks);
data (data); the classifier and its loss (model, pooling); DP (privacy); the training loop
(train); evaluation (evaluation); checkpoints and resume (resume) with their fingerprint
(fingerprint); atomic outputs (outputs); torchrun (distributed); plots comparing runs (compare).
"""

from rmt_kernels.glue.tasks import TASKS, Task, get_task

__all__ = ["TASKS", "Task", "get_task"]
