"""Model-side modules for PDF: the vCLUB estimator (the Hugging Face wrappers land with the model issue)."""

from .vclub import VCLUB

__all__ = ["VCLUB"]
