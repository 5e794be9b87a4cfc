"""The sigmoid loss on one global batch spread over N ranks (torchrun), and its memory per rank.

    python -m torch.distributed.run --nproc_per_node N tests/sigmoid_probe.py OUT.safetensors LOCAL DIM
    python tests/sigmoid_probe.py OUT_{local}.safetensors LOCAL,LOCAL2,... DIM   (one process, each size in turn)

Every rank takes its rows of the same seeded global embeddings; rank 0 writes the global loss,
the gradients of the global embeddings (gathered), of the scale and the bias (averaged over
ranks, as DDP does), and ``peak``: the largest rise of resident memory over the loss's forward
and backward on any rank (the process runs with MALLOC_MMAP_THRESHOLD_ so RSS follows tensors).
"""

import sys
import threading
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vlframe.runtime import distributed
from vlframe_builtins.objectives import SigmoidConfig, SigmoidLoss


def main(out: Path, local: int, dim: int) -> None:
    rank, world = distributed.rank(), distributed.world_size()
    torch.manual_seed(0)
    image_all = F.normalize(torch.randn(world * local, dim, dtype=torch.float32), dim=-1)  # the same global
    text_all = F.normalize(torch.randn(world * local, dim, dtype=torch.float32), dim=-1)  # batch for any split
    rows = slice(rank * local, (rank + 1) * local)
    loss_fn = SigmoidLoss(SigmoidConfig(type="sigmoid"))

    def run():
        image = image_all[rows].clone().requires_grad_(True)
        text = text_all[rows].clone().requires_grad_(True)
        loss = loss_fn({"image_embeds": image, "text_embeds": text})
        loss.backward()
        return loss, image, text

    run()  # warm-up: buffers of the process group and the allocator
    loss_fn.zero_grad()
    proc, peak, stop = psutil.Process(), [0], threading.Event()
    base = proc.memory_info().rss

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss - base)
            stop.wait(0.0002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    loss, image, text = run()
    stop.set()
    watcher.join()
    grads = {"image": image.grad, "text": text.grad}
    if world > 1:
        gathered = {}
        for name, g in grads.items():
            parts = [torch.empty_like(g) for _ in range(world)]
            torch.distributed.all_gather(parts, g.contiguous())
            gathered[name] = torch.cat(parts)
        grads = gathered
    # DDP averages parameter gradients, and each rank's embedding gradient is d(its loss): the
    # global loss is the mean over ranks, so both are divided by the world size.
    result = {
        "loss": distributed.all_reduce_mean(loss.detach()).reshape(1),
        "grad_image": grads["image"] / world,
        "grad_text": grads["text"] / world,
        "grad_log_scale": distributed.all_reduce_mean(loss_fn.log_scale.grad).reshape(1),
        "grad_bias": distributed.all_reduce_mean(loss_fn.bias.grad).reshape(1),
        "peak": torch.tensor([float(peak[0])]),
    }
    if world > 1:
        torch.distributed.all_reduce(result["peak"], op=torch.distributed.ReduceOp.MAX)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in result.items()}, str(out))
    distributed.barrier()


if __name__ == "__main__":
    distributed.setup_from_env()
    for size in sys.argv[2].split(","):  # one process: several global batches, measured one after another
        main(Path(sys.argv[1].format(local=size)), int(size), int(sys.argv[3]))
    distributed.teardown()
