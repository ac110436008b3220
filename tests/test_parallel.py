"""Parallel state on megatron-core: rank order, seeding, byte counters, the self-check, the harness itself."""

from __future__ import annotations

import ast
import os
import time
from pathlib import Path

import pytest
import torch

from megatron_video.parallel import ParallelConfig, ParallelConfigError
from tests.harness import RankFailure, run_distributed

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_video"


def _layout(tp: int, cp: int, pp: int):
    from megatron_video.parallel import initialize_parallel, parallel_layout

    initialize_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp, pipeline_model_parallel_size=pp)
    return parallel_layout()


@pytest.mark.slow
def test_rank_order_is_megatrons_tp_cp_dp_pp():
    layouts = run_distributed(_layout, 8, 2, 2, 2)
    for rank, item in enumerate(layouts):
        # tp fastest, then cp, then dp, then pp (DESIGN §4)
        assert item["tp_rank"] == rank % 2
        assert item["cp_rank"] == (rank // 2) % 2
        assert item["dp_rank"] == 0  # 8 / (2*2*2) = 1 replica
        assert item["pp_rank"] == rank // 4
        assert item["tp_group"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert item["pp_group"] == [rank % 4, rank % 4 + 4]
        assert sorted(item["dp_cp_group"]) == sorted(item["cp_group"])


def _seeded_draws(tp: int):
    from megatron.core import parallel_state as mpu
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from megatron_video.parallel import initialize_parallel, set_seed

    initialize_parallel(tensor_model_parallel_size=tp)
    set_seed(99)
    replicated = torch.rand(4)
    with get_cuda_rng_tracker().fork():
        sharded = torch.rand(4)
    return mpu.get_tensor_model_parallel_rank(), replicated, sharded


@pytest.mark.slow
def test_seed_same_for_replicas_different_for_tp_shards():
    results = run_distributed(_seeded_draws, 2, 2)
    (_, rep0, shard0), (_, rep1, shard1) = results
    torch.testing.assert_close(rep0, rep1, rtol=0, atol=0)
    assert not torch.equal(shard0, shard1)
    again = run_distributed(_seeded_draws, 2, 2)
    torch.testing.assert_close(again[0][2], shard0, rtol=0, atol=0)


def _count_bytes():
    import torch.distributed as dist

    from megatron_video.parallel import CommCounter

    x = torch.ones(10, dtype=torch.float32)
    with CommCounter() as counter:
        dist.all_reduce(x)
        out = torch.empty(40)
        dist.all_gather_into_tensor(out, torch.ones(10))
        dist.all_to_all_single(torch.empty(8), torch.ones(8))
    dist.all_reduce(x)  # outside the block: not counted
    return counter.summary()


@pytest.mark.slow
def test_comm_counter_bytes():
    summary = run_distributed(_count_bytes, 4)[0]
    assert summary["all_reduce"] == {"calls": 1, "payload_bytes": 40, "wire_bytes": 40 * 2 * 3 / 4}
    assert summary["all_gather_into_tensor"]["payload_bytes"] == 40
    assert summary["all_gather_into_tensor"]["wire_bytes"] == 40 * 3
    assert summary["all_to_all_single"]["wire_bytes"] == 32 * 3 / 4


def test_parallel_config_errors():
    with pytest.raises(ParallelConfigError, match="world size 6 is not divisible by TP x CP x PP = 4 x 1 x 1 = 4"):
        ParallelConfig(tensor_model_parallel_size=4).validate(6)
    with pytest.raises(ParallelConfigError, match="virtual pipeline size 2 needs --pipeline-model-parallel-size > 1"):
        ParallelConfig(virtual_pipeline_model_parallel_size=2).validate(1)
    assert ParallelConfig(tensor_model_parallel_size=2, context_parallel_size=2).data_parallel_size(8) == 2


@pytest.mark.slow
def test_selfcheck_passes_on_four_ranks(capsys):
    from megatron_video.parallel.selfcheck import main

    assert main(["--world-size", "4", "--tp", "2", "--pp", "2"]) == 0
    out = capsys.readouterr().out
    assert "TP 2 x CP 1 x PP 2 x DP 1" in out
    assert "PASS" in out
    assert out.count("rank ") >= 4


def _sleep_forever():
    time.sleep(600)


def _die_hard():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        os._exit(3)
    dist.barrier()


def test_harness_times_out_instead_of_hanging():
    start = time.monotonic()
    with pytest.raises(RankFailure, match="did not finish within 3 s"):
        run_distributed(_sleep_forever, 2, timeout=3)
    assert time.monotonic() - start < 30


def test_harness_names_a_crashed_rank():
    with pytest.raises(RankFailure) as info:
        run_distributed(_die_hard, 2, timeout=60)
    assert info.value.rank == 1
    assert "exit code 3" in str(info.value)


def _patched_targets(tree: ast.AST) -> list[str]:
    """Assignments / setattr calls whose target is an attribute of torch or megatron."""
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for target in targets:
            if isinstance(target, ast.Attribute):
                root = target
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and root.id in ("torch", "megatron", "dist", "mpu"):
                    found.append(ast.unparse(target))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Name) and first.id in ("torch", "dist", "megatron"):
                found.append(ast.unparse(node))
    return found


def test_only_the_adaptor_patches_torch_or_megatron():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        if "adaptor" in path.relative_to(PACKAGE).parts:
            continue
        found = _patched_targets(ast.parse(path.read_text()))
        if found:
            offenders[str(path.relative_to(PACKAGE))] = found
    assert offenders == {}
    # the detector itself must see the adaptor's patches
    assert _patched_targets(ast.parse((PACKAGE / "adaptor" / "cpu.py").read_text()))


def _stop_one_rank(out_dir: str) -> None:
    """Rank 3 stops (SIGSTOP: alive, silent); every other rank runs one collective on its TP group and one on
    its DP group, and records how long it took to fail. Rank 0 ends the stopped rank once the others are done."""
    import signal

    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    from megatron_video.parallel import initialize_parallel

    initialize_parallel(tensor_model_parallel_size=2)  # TP groups {0,1} {2,3}, DP groups {0,2} {1,3}
    rank, out = dist.get_rank(), Path(out_dir)
    (out / f"pid{rank}").write_text(str(os.getpid()))
    dist.barrier()
    if rank == 3:
        os.kill(os.getpid(), signal.SIGSTOP)
    start, error = time.monotonic(), ""
    try:
        for group in (mpu.get_tensor_model_parallel_group(), mpu.get_data_parallel_group()):
            dist.all_reduce(torch.ones(1), group=group)
    except RuntimeError as exc:
        error = str(exc).splitlines()[0]
    (out / f"rank{rank}").write_text(f"{time.monotonic() - start}\n{error}")
    if rank == 0:
        while not all((out / f"rank{r}").exists() for r in (1, 2)):
            time.sleep(0.1)
        os.kill(int((out / "pid3").read_text()), signal.SIGKILL)


@pytest.mark.slow
def test_stopped_rank_fails_its_peers_within_the_timeout(tmp_path):
    """The --distributed-timeout-minutes of the default group reaches megatron's model-parallel groups (they
    had megatron's 30-minute default): with a 6 s timeout, every peer of a stopped rank fails within it.
    gloo honours a group's timeout (torch.distributed.new_group(timeout=...), "applicable for gloo")."""
    timeout_s = 6.0
    with pytest.raises(RankFailure) as info:  # the stopped rank never reports; rank 0 kills it at the end
        run_distributed(_stop_one_rank, 4, str(tmp_path), timeout=240, collective_timeout_s=timeout_s)
    assert info.value.rank == 3, str(info.value)
    for rank in (0, 1, 2):
        elapsed, error = (tmp_path / f"rank{rank}").read_text().split("\n", 1)
        assert error, f"rank {rank} did not fail"
        # rank 0's DP peer (rank 2) only gives up after its own timeout: at most two timeouts, plus scheduling
        assert float(elapsed) < 2 * timeout_s + 30, (rank, elapsed, error)
