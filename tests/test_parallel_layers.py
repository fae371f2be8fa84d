"""Each parallel layer on real gloo ranks (world sizes 1-4) against the dense layer it shards, in float64: the
column-parallel linear, the tiled row-parallel linear (tile plans that do not divide the rows), the
vocabulary-parallel embedding and LM head (vocabularies the world size does not divide)."""
import pytest
import torch
import torch.nn.functional as F

from fastattn_dist import spawn_ranks

HIDDEN, OUT, ROWS, VOCAB = 12, 24, 29, 37  # OUT splits over 1-4 ranks; VOCAB over none but 1


def dense(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(ROWS, HIDDEN, generator=g, dtype=torch.float64),
            "w_col": torch.randn(OUT, HIDDEN, generator=g, dtype=torch.float64),
            "b_col": torch.randn(OUT, generator=g, dtype=torch.float64),
            "w_row": torch.randn(HIDDEN, OUT, generator=g, dtype=torch.float64),
            "b_row": torch.randn(HIDDEN, generator=g, dtype=torch.float64),
            "table": torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64),
            "ids": torch.randint(0, VOCAB, (ROWS,), generator=g)}


def layers_job(rank, world):
    """Every layer's output on this rank, from this rank's shard of the dense weights."""
    from fastattn_dist.parallel.comm import ProcessGroupAllReduce
    from fastattn_dist.parallel.layers import (ColumnParallelLinear, TiledRowParallelLinear, VocabParallelEmbedding,
                                               VocabParallelLMHead)
    from fastattn_dist.parallel.sharding import TPShape
    from fastattn_dist.parallel.tile_plan import TilePlan

    d, comm, kw = dense(), ProcessGroupAllReduce(), {"dtype": torch.float64}
    n = OUT // world
    cols = slice(rank * n, (rank + 1) * n)
    col = ColumnParallelLinear(HIDDEN, n, bias=True, **kw)
    col.load(d["w_col"][cols], d["b_col"][cols])
    row = TiledRowParallelLinear(n, HIDDEN, bias=True, **kw)
    row.load(d["w_row"][:, cols], d["b_row"])
    x_local = d["x"] @ d["w_col"][cols].t()  # what a column-parallel layer hands its row-parallel partner
    out = {"col": col(d["x"]), "row_rows": row.run_rows(x_local, comm)}
    for plan in (TilePlan.single(ROWS), TilePlan((0, 5, 17, 28, ROWS))):
        y = torch.empty(ROWS, HIDDEN, dtype=torch.float64)
        handles = row.run(plan, lambda i, r0, r1: x_local[r0:r1], y, comm)
        comm.wait_all(handles)
        out[f"row_{plan.num_tiles}"] = y + row.bias
    shape = TPShape.checked(HIDDEN, 12, 12, world, rank, head_dim=1, vocab_size=VOCAB)
    emb = VocabParallelEmbedding(shape, **kw)
    emb.load_rows(d["table"][shape.vocab_start:shape.vocab_start + shape.local_vocab])
    head = VocabParallelLMHead(shape, emb.weight)
    out["embed"] = emb(d["ids"], comm)
    out["logits"] = head(d["x"], comm)
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_parallel_layers_equal_the_dense_layers(world):
    d = dense()
    want_col = F.linear(d["x"], d["w_col"], d["b_col"])
    want_row = d["x"] @ d["w_col"].t() @ d["w_row"].t() + d["b_row"]
    for rank, out in enumerate(spawn_ranks(layers_job, world, timeout_s=60)):
        n = OUT // world
        assert torch.allclose(out["col"], want_col[:, rank * n:(rank + 1) * n], rtol=0, atol=1e-12)
        for key in ("row_rows", "row_1", "row_4"):  # every rank holds the reduced sum, whatever the tiles
            assert torch.allclose(out[key], want_row, rtol=1e-12, atol=1e-12), (rank, key)
        assert torch.allclose(out["embed"], F.embedding(d["ids"], d["table"]), rtol=0, atol=1e-12)
        assert out["logits"].shape == (ROWS, VOCAB)  # the padding rows of the last rank are cut off
        assert torch.allclose(out["logits"], (d["x"] @ d["table"].t()).float(), rtol=1e-6, atol=1e-5)


def test_vocabulary_not_divisible_by_the_world_is_padded_on_the_last_rank():
    from fastattn_dist.parallel.sharding import TPShape

    shapes = [TPShape.checked(12, 12, 12, 3, r, head_dim=1, vocab_size=37) for r in range(3)]
    assert [s.local_vocab for s in shapes] == [13, 13, 13] and [s.vocab_start for s in shapes] == [0, 13, 26]
    with pytest.raises(ValueError, match="intermediate_size"):
        TPShape.checked(12, 6, 3, 3, 0, intermediate_size=20)


def test_a_layer_refuses_a_shard_of_the_wrong_shape_and_knows_it_has_no_weights():
    from fastattn_dist.parallel.layers import ColumnParallelLinear

    lin = ColumnParallelLinear(4, 3, bias=False)
    assert not lin.loaded
    with pytest.raises(ValueError, match=r"shape \[3, 4\]"):
        lin.load(torch.randn(4, 3))
    with pytest.raises(ValueError, match="bias"):
        lin.load(torch.randn(3, 4), torch.randn(3))
    lin.load(torch.randn(3, 4))
    assert lin.loaded
