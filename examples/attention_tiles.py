"""The attention API on its own: masks as descriptions, and a tile of query rows at its offset.

    python examples/attention_tiles.py
"""
import torch

import fastattn_dist as fa

B, S, Hq, Hkv, D = 1, 1000, 8, 2, 64                    # GQA: 4 query heads per kv head
q, k, v = torch.randn(B, S, Hq, D), torch.randn(B, S, Hkv, D), torch.randn(B, S, Hkv, D)

whole = fa.attention(q, k, v, mask="causal")            # [B, S, Hq, D]
r0, r1 = 600, 800                                       # one tile: rows 600..799, at their causal offset
tile = fa.attention(q[:, r0:r1], k, v, mask="causal", q_offset=r0)
print("tile == rows of the whole call:", torch.allclose(tile, whole[:, r0:r1], atol=1e-5))

out, lse = fa.attention(q, k, v, mask=fa.SlidingWindow(128), return_lse=True)
print("sliding window output", tuple(out.shape), "log-sum-exp", tuple(lse.shape))
