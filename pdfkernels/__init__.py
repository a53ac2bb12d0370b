"""pdfkernels: fused kernels for Parallel Decoupling Framework (PDF) embedding training.

Public ops (validated inputs, explicit dispatch; see ``pdfkernels.backend``):

- ``prefix_attention`` / ``prefix_attention_varlen``: attention over N paths of deep prefixes.
- ``gaussian_loglik_pairwise``, ``mim_loss``, ``estimator_nll``: the vCLUB Gaussian terms.

Each is a registered ``torch.library`` op underneath (``torch.ops.pdfkernels.*``, with fake implementations and
autograd), so ``torch.compile`` traces them and CUDA graphs capture them (docs/compile.md).
``pdfkernels.reference`` holds the plain-PyTorch specification of each. The model patches, trainer and
benchmarks are ``pdfkernels.models``, ``pdfkernels.train`` and ``pdfkernels.bench``.
"""

from . import _subpackages
from .gaussian_mim import estimator_nll, mim_loss
from .gaussian_pairwise import gaussian_loglik_pairwise
from .prefix_attention import prefix_attention, prefix_attention_varlen

_subpackages.install()  # pdfkernels.models / .train / .bench in a source checkout

__all__ = [
    "estimator_nll",
    "gaussian_loglik_pairwise",
    "mim_loss",
    "prefix_attention",
    "prefix_attention_varlen",
]
__version__ = "0.1.0"
