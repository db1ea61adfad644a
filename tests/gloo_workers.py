"""Run a function in a group of spawned processes joined by torch.distributed over gloo on 127.0.0.1."""

import functools
import socket

import torch.multiprocessing as mp


def run_gloo_workers(target, sizes: list[int], timeout: float = 120) -> list:
    """``target(rank, port, sizes, queue)`` in ``len(sizes)`` processes; each puts one result tuple that starts with
    its rank. Returns the results sorted by rank, after every process exited cleanly."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, port, sizes, out)) for r in range(len(sizes))]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=timeout) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def sharded_losses(setup, sizes: list[int]) -> list[tuple[int, float, float]]:
    """``head, texts, regions = setup()`` on every rank, each rank's ``head.loss`` on its slice of ``sizes`` rows;
    per rank: (rank, its loss, the row-weighted mean of every rank's loss: the whole batch's if the loss is a mean
    over local rows)."""
    return run_gloo_workers(functools.partial(_sharded_loss, setup), sizes)


def _sharded_loss(setup, rank: int, port: int, sizes: list[int], out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(sizes))
    try:
        head, texts, regions = setup()
        start = sum(sizes[:rank])
        local = slice(start, start + sizes[rank])
        loss = head.loss(texts[local], regions[local]).detach()
        weighted = loss * sizes[rank]
        dist.all_reduce(weighted)
        out.put((rank, float(loss), float(weighted) / sum(sizes)))
    finally:
        dist.destroy_process_group()
