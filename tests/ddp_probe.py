"""One training forward/backward, as the trainer does it, under any world size.

    python -m torch.distributed.run --nproc_per_node N tests/ddp_probe.py OUT.pt WORKDIR

Rank 0 saves the global loss, per-objective losses and every parameter's gradient after DDP's
all-reduce, so runs on 1 and 2 processes can be compared on the same global batch.
"""

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from registry import Kind  # noqa: E402
from vlframe.config import files as configfile  # noqa: E402
from vlframe.runtime import distributed  # noqa: E402
from vlframe.api import build_tokenizer  # noqa: E402
from vlframe.data.loading import Collate, ImageTextSource, build_transform, train_loader  # noqa: E402

from training_configs import TINY, micro  # noqa: E402


def main(out: Path, workdir: Path) -> None:
    config, registry = configfile.load(TINY, micro(workdir))
    device = distributed.setup_from_env()
    rank, world = distributed.rank(), distributed.world_size()
    catalog = registry.catalog
    dataset = catalog.build(Kind.DATASET, config.data.train, split="train")
    tokenizer = build_tokenizer(config, registry)
    tokenizer.train(dataset.captions(), workdir / f"tok{rank}")  # deterministic: equal on every rank
    torch.manual_seed(0)
    model = catalog.build(Kind.MODEL, config.model, catalog=catalog)
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    source = ImageTextSource(dataset, build_transform(config.data, 64, train=True), seed=0, random_caption=True)
    loader = train_loader(source, Collate(tokenizer, config.model.context_length), config.data,
                          global_batch=config.train.batch_size, rank=rank, world=world, seed=0, start_step=0)
    batch = next(iter(loader))
    out_ = ddp(batch.images.to(device), batch.text.to(device), batch.text_mask.to(device))
    out_.loss.backward()
    result = {
        "loss": distributed.all_reduce_mean(out_.loss).item(),
        "losses": {k: distributed.all_reduce_mean(v).item() for k, v in out_.losses.items()},
        "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
        "world": world,
    }
    if rank == 0:
        torch.save(result, out)
    distributed.barrier()  # no rank leaves the group while another still works in it
    distributed.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
