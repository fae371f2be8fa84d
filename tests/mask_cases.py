"""The masks the kernel tests sweep, by name: each kind once, and key lengths that differ within the batch."""
from fastattn_dist import Causal, KeyPadding, NoMask, SlidingWindow


def make_mask(name: str, batch: int, keys: int, window: int):
    """Mask ``name`` for ``batch`` sequences of ``keys`` keys (``window``: the sliding window's width)."""
    lengths = {"pad_causal": [max(1, keys // 2), keys], "pad_full": [keys, max(1, keys - 5)]}
    if name in lengths:
        return KeyPadding(lengths[name][:batch] + [keys] * (batch - 2), causal=name == "pad_causal")
    return {"none": NoMask, "causal": Causal, "window": lambda: SlidingWindow(window)}[name]()
