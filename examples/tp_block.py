"""A tensor-parallel attention block in your own script.

    torchrun --standalone --nproc-per-node 2 examples/tp_block.py      # or: mpirun -n 2 python examples/tp_block.py
    python examples/tp_block.py                                         # one process: world size 1

Every rank builds the same full weights (here from a seed; in practice from a checkpoint), keeps its
shard, and gets the full output back.
"""
import torch

import fastattn_dist as fa

ctx = fa.init_distributed()  # torchrun, MPI, Slurm, or a single process
torch.manual_seed(0)
hidden, heads, kv_heads = 512, 8, 2
dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
wq, wk, wv, wo = (torch.randn(heads * 64, hidden), torch.randn(kv_heads * 64, hidden),
                  torch.randn(kv_heads * 64, hidden), torch.randn(hidden, heads * 64))

block = fa.TPAttention(hidden, heads, kv_heads, tiles="auto", dtype=dtype, device=ctx.device, rope_theta=10000.0)
block.load_full_weights(wq, wk, wv, wo)
x = torch.randn(2, 300, hidden, dtype=dtype, device=ctx.device)     # replicated input [batch, seq, hidden]

y = block(x, mask="causal")                                          # or fa.SlidingWindow(128), fa.KeyPadding(lengths)
if ctx.is_main:
    print(f"world {ctx.world_size}: output {tuple(y.shape)}, tile plan {block.last_plan.bounds}")
fa.shutdown()
