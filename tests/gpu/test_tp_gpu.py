"""Multi-GPU checks (NCCL): the tiled block equals the sequential block and the float64 reference.

Skipped without 2 CUDA GPUs; run with the device tool: ``python -m pytest tests/gpu -q``.
"""
import pytest
import torch

from fastattn_dist import spawn_ranks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs 2 CUDA GPUs")


def _gpu_grid(rank, world, cases):
    import fastattn_dist as fa
    from rank_jobs import make_input, make_weights

    dev = torch.device("cuda", rank)
    res = {}
    for hidden, heads, kv, batch, seq, mask in cases:
        w = make_weights(hidden, heads, kv)
        x = make_input(batch, seq, hidden)
        for graph, comm in ((False, "nccl"), (True, "nccl"), (False, "copy_engine"), (True, "copy_engine")):
            blk = fa.TPAttention(hidden, heads, kv, dtype=torch.bfloat16, device=dev, cuda_graph=graph, comm=comm)
            blk.load_full_weights(*w)
            xb = x.to(dev, torch.bfloat16)
            for tiles in (1, 3, 8, "auto"):
                y = blk(xb, mask=mask, tiles=tiles).float().cpu()
                res[(hidden, seq, mask, graph, comm, tiles)] = y
    return res


@pytest.mark.parametrize("world", [2] + ([4] if torch.cuda.device_count() >= 4 else []))
def test_tiled_equals_sequential_on_gpus(world):
    from conftest import REL_TOL, rel_err
    from fastattn_dist.reference_block import reference_block
    from rank_jobs import make_input, make_weights

    cases = [(1024, 16, 8, 1, 4099, "causal"), (512, 8, 4, 2, 1000, "none")]
    out = spawn_ranks(_gpu_grid, world, (cases,), backend="nccl", timeout_s=300)
    for hidden, heads, kv, batch, seq, mask in cases:
        w = make_weights(hidden, heads, kv)
        x = make_input(batch, seq, hidden)
        ref = reference_block(x.bfloat16().double(), *[t.bfloat16().double() for t in w], heads, kv, mask=mask)
        seq_out = out[0][(hidden, seq, mask, False, "nccl", 1)]
        for key, y in out[0].items():
            if key[:3] != (hidden, seq, mask):
                continue
            assert rel_err(y, ref) <= REL_TOL[torch.bfloat16], key
            assert rel_err(y, seq_out) <= REL_TOL[torch.bfloat16], key
            assert torch.equal(y, out[1][key]), key
