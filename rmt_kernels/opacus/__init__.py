"""Drop-in replacements for Opacus's DP optimizers and PrivacyEngine that denoise the noisy 2-D
gradients by singular-value shrinkage before the optimizer step.

The classes here subclass Opacus's, so importing this subpackage imports Opacus. Opacus is a core
dependency (rmt_kernels.dp uses its accountants, and calibration and the sampler its helpers), but
every module outside this subpackage imports it inside the function that needs it, so
``import rmt_kernels`` alone does not load it (tests/test_opacus_dropin.py checks that).
Written against opacus==1.6.0 (pinned in requirements/test.txt): the extension points used are
``DPOptimizer.scale_grad`` (the last thing ``pre_step`` does to ``p.grad`` before the accountant's
step hook), ``DPOptimizer.add_noise`` (the Philox noise), ``PrivacyEngine._prepare_optimizer``,
``PrivacyEngine._prepare_data_loader`` and, for certified ghost clipping (privacy invariant 6,
PRIVACY.md; :mod:`rmt_kernels.opacus.ghost`), ``PrivacyEngine._prepare_model`` and the
``NORM_SAMPLERS`` / ``get_clipping_coef`` of Opacus's ghost-clipping module wrapper.

Example:
    >>> from rmt_kernels.opacus import DenoisingPrivacyEngine
    >>> engine = DenoisingPrivacyEngine()
    >>> model, optimizer, loader = engine.make_private(
    ...     module=model, optimizer=optimizer, data_loader=loader,
    ...     noise_multiplier=1.0, max_grad_norm=1.0, denoise={"kappa": 1.0, "norm": "preserve"})
"""

from rmt_kernels.opacus.ghost import (
    CERTIFIED_NORM_SAMPLERS,
    CertifiedGradSampleHooksFastGradientClipping,
    CertifiedGradSampleModuleFastGradientClipping,
)
from rmt_kernels.opacus.optimizers import (
    DenoisingDistributedDPOptimizer,
    DenoisingDistributedDPOptimizerFastGradientClipping,
    DenoisingDPOptimizer,
    DenoisingDPOptimizerFastGradientClipping,
    DenoisingDPPerLayerOptimizer,
    DenoisingSimpleDistributedPerLayerOptimizer,
    denoising_optimizer_class,
)
from rmt_kernels.opacus.privacy_engine import DenoisingPrivacyEngine

__all__ = [
    "CERTIFIED_NORM_SAMPLERS",
    "CertifiedGradSampleHooksFastGradientClipping",
    "CertifiedGradSampleModuleFastGradientClipping",
    "DenoisingDPOptimizer",
    "DenoisingDPOptimizerFastGradientClipping",
    "DenoisingDPPerLayerOptimizer",
    "DenoisingDistributedDPOptimizer",
    "DenoisingDistributedDPOptimizerFastGradientClipping",
    "DenoisingPrivacyEngine",
    "DenoisingSimpleDistributedPerLayerOptimizer",
    "denoising_optimizer_class",
]
