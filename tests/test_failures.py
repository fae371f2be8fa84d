"""Bad input fails on every rank before any collective; a rank that raises, dies or hangs is named, never a hang."""
import time

import pytest
import torch

from fastattn_dist import RankFailedError, spawn_ranks
from rank_jobs import construct_block, die_on, disagreeing_inputs, forward_with, hang_on, pid_then_sleep, raise_on


@pytest.mark.parametrize("job,args", [(raise_on, (1,)), (die_on, (1,)), (raise_on, (0,)), (die_on, (2,))],
                         ids=["raise1", "die1", "raise0", "die2"])
def test_failing_rank_is_named(job, args):
    t0 = time.monotonic()
    with pytest.raises(RankFailedError) as info:
        spawn_ranks(job, 3, args, timeout_s=60)
    assert info.value.rank == args[0], str(info.value)
    assert f"rank {args[0]} of 3 failed" in str(info.value)
    # the peers' raw transport errors are consequences: kept in .errors, not repeated in the message
    assert "then:" not in str(info.value) and "Connection" not in str(info.value), str(info.value)
    assert time.monotonic() - t0 < 45  # not the 60 s collective timeout: the peers failed at once


def test_hung_rank_times_out_and_is_named():
    # Rank 1 sleeps: alive and heartbeating, so not stuck. Rank 0's all-reduce times out, and the
    # error names rank 1, which never joined it, not rank 0, which timed out waiting.
    t0 = time.monotonic()
    with pytest.raises(RankFailedError) as info:
        spawn_ranks(hang_on, 2, (1, 60), timeout_s=3)
    assert info.value.rank == 1, str(info.value)
    assert "still running" in info.value.errors[1][0]
    assert "imed out" in info.value.errors[0][0], info.value.errors[0]
    assert time.monotonic() - t0 < 50  # the 3 s timeout, not rank 1's 60 s sleep (slack for a busy machine)


def test_explicit_deadline_bounds_the_run(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(RankFailedError) as info:
        spawn_ranks(pid_then_sleep, 2, (str(tmp_path), 60), timeout_s=30, deadline_s=4)
    assert sorted(info.value.errors) == [0, 1]
    assert all("deadline_s=4" in summary for summary, _ in info.value.errors.values()), info.value.errors
    assert time.monotonic() - t0 < 45  # the 4 s deadline, not the 60 s sleep (slack for a busy machine)


BAD_BLOCKS = [
    (dict(hidden_size=48, num_heads=6, num_kv_heads=2), "divisible by the world size"),       # 6 heads, 4 ranks
    (dict(hidden_size=64, num_heads=8, num_kv_heads=2), "num_kv_heads (2) must be divisible"),  # 2 kv, 4 ranks
    (dict(hidden_size=64, num_heads=8, num_kv_heads=3), "divisible by num_kv_heads"),
    (dict(hidden_size=60, num_heads=8, num_kv_heads=4), "hidden_size (60) must be divisible"),
    (dict(hidden_size=64, num_heads=8, num_kv_heads=4, tiles=0), "tiles must be >= 1"),
]


@pytest.mark.parametrize("kwargs,message", BAD_BLOCKS, ids=[m[:24] for _, m in BAD_BLOCKS])
def test_bad_block_fails_on_every_rank(kwargs, message):
    with pytest.raises(RankFailedError) as info:
        spawn_ranks(construct_block, 4, (kwargs,), timeout_s=30)
    errors = info.value.errors
    assert sorted(errors) == [0, 1, 2, 3]
    for r, (summary, _) in errors.items():  # each rank raised it itself: nobody waited on a collective
        assert summary.startswith("ValueError") and message in summary, (r, summary)


def test_bad_forward_input_fails_on_every_rank():
    with pytest.raises(RankFailedError) as info:
        spawn_ranks(forward_with, 2, ((1, 0, 16), torch.float32, "causal"), timeout_s=30)
    assert all(s.startswith("ValueError") and "empty" in s for s, _ in info.value.errors.values())


@pytest.mark.parametrize("world,odd", [(2, 1), (3, 0)], ids=["world2_rank1", "world3_rank0"])
def test_ranks_with_different_inputs_all_fail_naming_the_odd_rank(world, odd):
    """check_inputs=True: every rank raises a ValueError that names the rank that differs (against the
    majority, so in a world of 3 rank 0 is the odd one), never a hang or a dead rank (spawn_ranks would
    raise RankFailedError)."""
    t0 = time.monotonic()
    results = spawn_ranks(disagreeing_inputs, world, (odd,), timeout_s=30)
    assert time.monotonic() - t0 < 150
    others = [r for r in range(world) if r != odd]
    what = {"seq": "shape", "mask": "mask", "window": "mask", "key_lengths": "key_lengths",
            "input": "input_checksum", "rows_swapped": "input_checksum"}
    for rank, (messages, calls) in enumerate(results):
        for case, key in what.items():
            msg = messages[case]
            assert msg is not None, (rank, case)
            assert msg.startswith("ranks disagree on the block's input") and f"({key})" in msg, (rank, case, msg)
            assert f"rank {odd} has {key}=" in msg, (rank, case, msg)
            if world == 3:
                assert f"ranks {others[0]}, {others[1]} have {key}=" in msg, msg
            assert calls[case] == 1
        assert messages["equal"] is None and calls["equal"] == 2   # two shapes: one check each
        assert messages["attend"] is None and calls["attend"] == 1
