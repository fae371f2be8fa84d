"""One-GPU TP emulation on a real GPU: the comm stand-in's timing, and the tiled block on prioritised tile
streams equal to the sequential block. Skipped without CUDA; run with ``python -m pytest tests/gpu``."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BF16 = torch.bfloat16


def _graph_ms(fn, repeats=15):
    """Median ms of ``fn`` replayed as a CUDA graph (the package's own capture and timer)."""
    from fastattn_dist.parallel.graphs import capture_cuda
    from fastattn_dist.runner import median_ms

    return median_ms(capture_cuda(fn, warmup=1), torch.device("cuda"), repeats, 0)


@pytest.mark.parametrize("path", ["nccl", "copy_engine"])
@pytest.mark.parametrize("tp", [2, 4])
def test_standin_lasts_its_modelled_time(tp, path):
    from fastattn_dist.parallel.emulated_comm import StandInAllReduce
    from fastattn_dist.parallel.link_models import GpuLinkModel

    comm = StandInAllReduce(tp, GpuLinkModel.for_world_size(tp, path=path))
    for mb in (8, 32, 128):
        x = torch.randn(mb << 19, device="cuda").to(BF16)
        want = comm.model.allreduce_seconds(x.numel() * 2, tp) * 1e3
        got = _graph_ms(lambda: comm.issue(x))
        assert want <= got * 1.02 and got <= want * 1.10 + 0.02, (mb, want, got)


@pytest.mark.parametrize("tp", [2, 4])
def test_emulated_tiles_equal_the_sequential_block(tp):
    """Every tile count, comm path and graph mode gives rank 0's partial sums as the 1-tile block does, and the
    float64 reference of rank 0's shard."""
    from conftest import REL_TOL, rel_err
    from fastattn_dist import TPAttention
    from fastattn_dist.parallel.comm import NoComm
    from fastattn_dist.parallel.emulated_comm import StandInAllReduce
    from fastattn_dist.parallel.link_models import GpuLinkModel
    from fastattn_dist.reference_block import reference_block
    from rank_jobs import make_input, make_weights

    hidden, heads, kv, B, S = 1024, 16, 8, 2, 1999
    w = make_weights(hidden, heads, kv)
    x = make_input(B, S, hidden)
    D, hl, kvl = hidden // heads, heads // tp, kv // tp
    wb = [t.to(BF16).double() for t in w]
    ref = reference_block(x.to(BF16).double(), wb[0][: hl * D], wb[1][: kvl * D], wb[2][: kvl * D],
                          wb[3][:, : hl * D], hl, kvl)
    comms = {"none": NoComm(tp), "nccl": StandInAllReduce(tp),
             "ce": StandInAllReduce(tp, GpuLinkModel.for_world_size(tp, path="copy_engine"))}
    first = None
    for name, comm in comms.items():
        for graph in (False, True):
            blk = TPAttention(hidden, heads, kv, dtype=BF16, device="cuda", comm=comm, cuda_graph=graph)
            blk.load_full_weights(*w)
            for tiles in (1, 2, 3, 5, "auto"):
                y = blk(x.to("cuda", BF16), tiles=tiles).float().cpu()
                first = y if first is None else first
                assert rel_err(y, ref) <= REL_TOL[BF16], (name, graph, tiles)
                assert rel_err(y, first) <= REL_TOL[BF16] / 4, (name, graph, tiles)


def test_parallel_tile_streams_change_no_bit():
    """Tiles on their own prioritised streams compute exactly what they compute on one stream."""
    from fastattn_dist import TPAttention
    from fastattn_dist.parallel.comm import NoComm
    from rank_jobs import make_input, make_weights

    w = make_weights(2048, 16, 16)
    x = make_input(1, 4096, 2048).to("cuda", BF16)
    outs = []
    for mode in ("one", "overlap", "staged", "lead"):
        blk = TPAttention(2048, 16, 16, dtype=BF16, device="cuda", comm=NoComm(2), tile_streams=mode)
        blk.load_full_weights(*w)
        outs.append(blk(x, tiles=4).clone())
    assert all(torch.equal(outs[0], o) for o in outs[1:])
