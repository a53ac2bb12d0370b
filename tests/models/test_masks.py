"""Every mask layout a decoder hands its attention becomes the key padding mask, or is refused."""

import pytest
import torch

from pdfkernels.models.masks import key_padding_mask

PADDING = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # left, none, right
B, L = PADDING.shape


def _visible(window: int | None = None) -> torch.Tensor:
    q, k = torch.arange(L)[:, None], torch.arange(L)[None, :]
    allowed = k <= q if window is None else (k <= q) & (q - k < window)
    return (allowed & PADDING[:, None, None, :].bool()).expand(B, 1, L, L)


def _additive(visible: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)


@pytest.mark.parametrize("layout", ["2d-int", "2d-bool", "4d-bool", "4d-additive-fp32", "4d-additive-bf16",
                                    "4d-wider-than-L", "4d-unmasked-padded-rows"])
def test_masks_become_the_key_padding_mask(layout):
    visible = _visible()
    mask = {"2d-int": PADDING, "2d-bool": PADDING.bool(), "4d-bool": visible,
            "4d-additive-fp32": _additive(visible), "4d-additive-bf16": _additive(visible, torch.bfloat16),
            "4d-wider-than-L": torch.cat([_additive(visible), torch.zeros(B, 1, L, 1)], dim=-1),
            # as SDPA on CUDA before 5.x: fully masked (padded) query rows attend everywhere
            "4d-unmasked-padded-rows": visible | ~visible.any(-1, keepdim=True)}[layout]
    assert torch.equal(key_padding_mask(mask, B, L), PADDING.bool())


def test_no_padding_gives_none():
    assert key_padding_mask(None, B, L) is None
    assert key_padding_mask(torch.ones(B, L, dtype=torch.long), B, L) is None
    causal = torch.ones(L, L, dtype=torch.bool).tril().expand(1, 1, L, L)
    assert key_padding_mask(causal, B, L) is None  # a batch-1 mask broadcast over the batch


def test_a_mask_modified_in_place_is_read_again():
    mask = torch.ones(B, L, dtype=torch.long)
    assert key_padding_mask(mask, B, L) is None
    mask[0, 0] = 0
    assert not key_padding_mask(mask, B, L)[0, 0]


@pytest.mark.parametrize("case", ["sliding-window", "bidirectional", "packed", "bias"])
def test_masks_other_than_causal_plus_padding_are_refused(case):
    if case == "sliding-window":
        mask = _additive(_visible(window=2))
    elif case == "bidirectional":
        mask = PADDING.bool()[:, None, None, :].expand(B, 1, L, L)
    elif case == "packed":  # two sequences in one row: the second may not see the first
        mask = _visible().clone()
        mask[:, :, 3:, :3] = False
    else:  # ALiBi-like biases are not a mask
        mask = _additive(_visible()) - 0.5 * torch.arange(L, dtype=torch.float32)
    with pytest.raises(NotImplementedError, match="pdf attention"):
        key_padding_mask(mask, B, L)


@pytest.mark.parametrize("mask, expected", [(torch.ones(B, L + 1), r"expected \[3, 5\]"),
                                            (torch.ones(B, 1, L - 1, L), r"expected \[3, 1, 5, 5\]"),
                                            (torch.ones(B, L, L), "3 dimensions"),
                                            (object(), "type object")])
def test_unusable_masks_are_refused_naming_what_was_expected(mask, expected):
    with pytest.raises(NotImplementedError, match=expected):
        key_padding_mask(mask, B, L)
