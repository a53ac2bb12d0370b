"""Model-side PDF: deep prefixes patched into every family of ``families.py`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
LLaVA-1.5/-NeXT, Phi-3-V; Hugging Face's or VLM2Vec's), path control, the aggregator and the vCLUB estimator, and
saving/loading the PDF weights."""

from .aggregator import Aggregator
from .patch import SUPPORTED, apply_pdf, encode, last_token, mark_pdf_trainable, pdf_parameters, text_config, use_paths
from .vclub import VCLUB
from .weights import load_pdf, save_pdf

__all__ = ["SUPPORTED", "Aggregator", "VCLUB", "apply_pdf", "encode", "last_token", "load_pdf",
           "mark_pdf_trainable", "pdf_parameters", "save_pdf", "text_config", "use_paths"]
