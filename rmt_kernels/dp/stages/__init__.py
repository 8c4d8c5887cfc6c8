"""The post-processing stages of the private step: what runs on the released noisy gradient
before it is written (privacy unchanged: post-processing), shared by the native engine and the
Opacus drop-in.

One module per idea: protocol.py (:class:`PostProcessor`, every hook a stage may declare, with
its default, and the adapter for a plain callable), options.py (the frozen ``denoise`` options,
checked once), denoiser.py (the Denoiser: singular-value shrinkage), chain.py (``denoise=`` and
``post_processors=`` made into one checked chain, and :func:`post_process`, which runs it),
temporal.py (EMA and DiSK filters), dp_adam.py (a DP-aware Adam stage), trajectory.py (shrinkage
of the accumulated update), state.py (the checks of their checkpoint state). A new stage is one
new subclass of :class:`PostProcessor` in its own file; the engines do not change. The public
names are exported by :mod:`rmt_kernels.dp`.
"""
