"""The training core every command shares (``rmt-glue train`` is one; the next is one folder of
the same shape beside ``rmt_kernels/glue/``).

One idea a module: the shared options and their checks (config: ``TrainConfig``, which an
application subclasses); the protocol an application implements (task: ``TrainingTask``: data,
model, loss, metrics); the loop (loop: ``train(cfg, task)``); privacy: the noise multiplier and
the engine (privacy); the post-processing chain and the learning-rate schedule (stages);
checkpoints and resume (resume) with their fingerprint (fingerprint); atomic outputs (outputs);
torchrun (distributed); plots comparing runs' logs (compare).

A new command: a folder with a ``TrainConfig`` subclass (its own options, ``check_application``),
a ``TrainingTask`` implementation, and a CLI that builds the config and calls
``loop.train(cfg, task)``.
"""
