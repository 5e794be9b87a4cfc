"""Process-group helpers for ``torchrun``: setup, rank queries, a gradient-keeping all-gather and ring shift.

Everything here works unchanged in a single process (world size 1), so the training loop and
the objectives never branch on whether they run distributed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor


# Inside local_only() this process computes as if alone (e.g. rank-0 validation).
_LOCAL: ContextVar[bool] = ContextVar("vlframe_local_only", default=False)


def is_distributed() -> bool:
    return not _LOCAL.get() and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """Run without collectives: losses use this rank's batch alone (for single-rank evaluation)."""
    token = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(token)


def rank() -> int:
    """This process's rank: 0 without a process group (and inside :func:`local_only`)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of ranks: 1 without a process group (and inside :func:`local_only`)."""
    return dist.get_world_size() if is_distributed() else 1


def setup_from_env(*, group: bool = False) -> torch.device:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1); return this rank's device.

    CUDA ranks use NCCL and their ``LOCAL_RANK`` GPU; CPU ranks use gloo. ``group``: a group
    even for one process (FSDP needs one), on a free loopback port when torchrun gave none.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    # GPU ranks get gloo beside NCCL: CPU tensors (FSDP's CPU offload, whole 0-d parameters
    # kept there) can then be reduced too.
    backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
    if (world > 1 or group) and not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, timeout=timedelta(minutes=30))
        else:  # a plain single process
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                    timeout=timedelta(minutes=30))
    return device


#: The name plugins (parallel strategies) use: ``vlframe.sdk.setup_process_group``.
setup_process_group = setup_from_env


def teardown(*, wait: bool = False) -> None:
    """Leave the process group; ``wait``: after every other rank has got here too."""
    if dist.is_available() and dist.is_initialized():
        if wait and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def broadcast_object(value: object) -> object:
    """Rank 0's ``value`` on every rank (itself in a single process)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agreed_signal(local: int | None) -> int | None:
    """A stop signal any rank received (the same answer on every rank), else None."""
    if not is_distributed():
        return local
    flag = torch.tensor([local or 0], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (every rank gets the same answer)."""
    if not is_distributed():
        return flag
    box = torch.tensor([int(flag)], dtype=torch.int64)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item())


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for without a process group)."""
    if is_distributed():
        dist.barrier()


def gather_names(names: list[str]) -> list[str]:
    """The union of ``names`` over ranks, sorted (every rank gets the same list; this rank's alone
    inside :func:`local_only`)."""
    if is_distributed():
        every: list[object] = [None] * dist.get_world_size()
        dist.all_gather_object(every, names)
        names = [n for part in every for n in part]  # type: ignore[union-attr]
    return sorted(set(names))


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sends every rank's gradient back to the rank that owns the rows.

    Backward sums the incoming gradients over ranks (an all-reduce) and keeps this rank's slice:
    rank r's embeddings get d(sum of every rank's loss)/d(rows of r). Works on gloo and NCCL.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_with_grad(x: Tensor) -> Tensor:
    """Rows of ``x`` from every rank, concatenated in rank order; gradients flow back to each."""
    return _GatherWithGrad.apply(x) if is_distributed() else x


class _RingShift(torch.autograd.Function):
    """Send ``x`` to the next rank and receive the previous rank's; backward sends each gradient
    back to the rank the rows came from (the reverse shift). Point-to-point, gloo and NCCL."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return _shift(x.contiguous(), +1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return _shift(grad.contiguous(), -1)


def _shift(x: Tensor, direction: int) -> Tensor:
    world, me = dist.get_world_size(), dist.get_rank()
    out = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x, (me + direction) % world), dist.P2POp(dist.irecv, out, (me - direction) % world)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return out


def ring_shift_with_grad(x: Tensor) -> Tensor:
    """The previous rank's ``x`` (this rank's goes to the next), gradients flowing back to it:
    applied ``k`` times, rank ``r`` holds rank ``r - k``'s rows. Itself in a single process."""
    return _RingShift.apply(x) if is_distributed() else x


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of ``x`` over ranks (a new tensor, no gradient)."""
    x = x.detach().clone()
    if is_distributed():
        dist.all_reduce(x)
    return x


def all_reduce_mean(x: Tensor) -> Tensor:
    return all_reduce_sum(x) / world_size()
