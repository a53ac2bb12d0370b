"""Model wrappers that put pdfkernels into Hugging Face Qwen2-VL and LLaVA models.

Empty until the model-wrapper issue lands; nothing here is public yet.
"""

__all__: list[str] = []
