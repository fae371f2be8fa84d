"""tiling-mask: the classification of (query tile, key block) pairs agrees with element-wise visibility."""
import itertools

import pytest
import torch

from fastattn_dist.masks import BlockKind, Causal, KeyPadding, NoMask, SlidingWindow, resolve_mask

MASKS = [NoMask(), Causal(), SlidingWindow(1), SlidingWindow(5), SlidingWindow(16),
         KeyPadding([7, 20]), KeyPadding([7, 20], causal=False), KeyPadding([3, 20], window=4)]


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: m.describe())
def test_classification_matches_visibility(mask):
    S = 24
    vis = mask.visible(torch.arange(S) + 3, torch.arange(S))  # a q_offset of 3
    if vis.dim() == 2:
        vis = vis[None]
    lens = mask.key_lengths
    lmin, lmax = (int(lens.min()), int(lens.max())) if lens is not None else (None, None)
    seen = set()
    for q0, q1, k0, k1 in itertools.product(range(0, S, 3), range(1, S + 1, 4), range(0, S, 5), range(1, S + 1, 3)):
        if q1 <= q0 or k1 <= k0:
            continue
        kind = mask.classify(q0 + 3, q1 + 3, k0, k1, lmin, lmax)
        block = vis[:, q0:q1, k0:k1]
        seen.add(kind)
        if kind is BlockKind.FULL:
            assert block.all(), (q0, q1, k0, k1)
        elif kind is BlockKind.SKIP:
            assert not block.any(), (q0, q1, k0, k1)
        elif lens is None:  # without padding the classification is exact
            assert block.any() and not block.all(), (q0, q1, k0, k1)
    if mask.causal:
        assert BlockKind.SKIP in seen and BlockKind.PARTIAL in seen


def test_string_masks_and_errors():
    assert resolve_mask("causal").causal and not resolve_mask("none").causal
    assert resolve_mask("sliding_window:8").window == 8
    assert resolve_mask(None).causal is False
    for bad in ("casual", "sliding_window:x", ""):
        with pytest.raises(ValueError):
            resolve_mask(bad)
    with pytest.raises(TypeError):
        resolve_mask(3)


@pytest.mark.parametrize("make,exc", [
    (lambda: SlidingWindow(0), ValueError),
    (lambda: SlidingWindow(-3), ValueError),
    (lambda: SlidingWindow(2.5), TypeError),
    (lambda: KeyPadding([1.5, 40]), TypeError),      # once silently truncated to 1
    (lambda: KeyPadding([True, 4]), TypeError),
    (lambda: KeyPadding("ab"), TypeError),
    (lambda: KeyPadding([3, 4], causal=1), TypeError),
])
def test_bad_masks_fail_where_they_are_written(make, exc):
    with pytest.raises(exc):
        make()


def test_key_length_check_reads_the_values_once_per_version():
    m = KeyPadding(torch.tensor([3, 8]))
    m.validate(2, 8)
    m.key_lengths[0] = 9          # an in-place change bumps the version: checked again
    with pytest.raises(ValueError):
        m.validate(2, 8)
    assert m.structure() == (True, None, True)


@pytest.mark.parametrize("mask,batch,seq,exc", [
    (KeyPadding([0, 3]), 2, 8, ValueError),      # a sequence with no key
    (KeyPadding([9, 3]), 2, 8, ValueError),      # longer than the keys
    (KeyPadding([3]), 2, 8, ValueError),         # one length per sequence
    (KeyPadding(torch.tensor([2.0, 3.0])), 2, 8, TypeError),
])
def test_mask_validation(mask, batch, seq, exc):
    with pytest.raises(exc):
        mask.validate(batch, seq)


def test_visible_keys_per_row_is_the_causal_cost():
    pos = torch.arange(10, dtype=torch.float64)
    assert Causal().visible_keys_per_row(pos, 10).tolist() == list(range(1, 11))
    assert SlidingWindow(3).visible_keys_per_row(pos, 10).tolist() == [1, 2] + [3] * 8
    assert NoMask().visible_keys_per_row(pos, 10).tolist() == [10] * 10
