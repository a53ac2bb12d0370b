"""VLM2Vec's ``MMEBModel`` with several paths in one call: its pooling gets k·B hidden rows beside the B-row mask.

``encode_input`` hands ``_pooling`` the language model's last hidden states and the caller's own
``attention_mask``. With k paths the language model ran on the inputs repeated k times, path-major (rows
``p·B + b``), so on a right-padded batch VLM2Vec's last-token indexing (B indices for k·B rows) fails. The
mask is the caller's tensor and the k-fold repetition happens inside the language model: only the
``MMEBModel`` instance sees both, so ``apply_pdf`` gives that instance (never its class, never VLM2Vec's
code) a ``_pooling`` that repeats the mask the same way before calling VLM2Vec's own pooling. The result is
k·B embeddings, path-major: rows ``p·B .. p·B + B - 1`` are path ``paths[p]``, equal to the single-path call.
"""

from __future__ import annotations

from torch import nn


def is_mmeb(model: nn.Module) -> bool:
    """VLM2Vec's wrapper (or a look-alike): an ``encoder`` module, ``encode_input`` and ``_pooling``."""
    return isinstance(getattr(model, "encoder", None), nn.Module) and hasattr(model, "encode_input") and hasattr(
        model, "_pooling")


def install_pooling(mmeb: nn.Module, state) -> None:
    """Give this ``MMEBModel`` instance the k-path pooling (``state``: the patched model's ``PDFState``)."""
    if "_pooling" in vars(mmeb):  # ours already (or the user's own override: left alone)
        return
    own = mmeb._pooling  # VLM2Vec's method, bound

    def pooling(last_hidden_state, attention_mask, *args, **kwargs):
        k = len(state.paths)
        if k > 1 and attention_mask is not None and last_hidden_state.shape[0] == k * attention_mask.shape[0]:
            attention_mask = attention_mask.repeat(k, *([1] * (attention_mask.dim() - 1)))
        return own(last_hidden_state, attention_mask, *args, **kwargs)

    pooling._pdf = True
    mmeb._pooling = pooling
