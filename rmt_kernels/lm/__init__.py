"""Decoder language models on E2E with DP-SGD, the ``rmt-lm`` command: the second application
of the shared training core (``rmt_kernels.training``), shaped as ``rmt_kernels.glue``.

One idea a module: the command (cli); its options on top of the core's (config: ``LmConfig``);
E2E data and the prompt format (data); the models, tokenizers, frozen norms and LoRA (model);
generation (generation); BLEU and ROUGE-L (metrics); evaluation during training and of a saved
model (evaluation); the task the core's loop trains (task: ``LmFineTuning``, ``train``).
"""
