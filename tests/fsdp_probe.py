"""One training forward/backward per variant, spread as the trainer spreads it (its parallel strategy).

    python -m torch.distributed.run --nproc_per_node N tests/fsdp_probe.py OUT.safetensors WORKDIR VARIANT...

A VARIANT is ``NAME:parallel=fsdp,ac=selective,compile=1,replicate=2,objectives=contrastive``. Every variant
starts from the same weights (a plain build with seed 0, loaded whole into the sharded model), so
that losses and gradients can be compared across world sizes and strategies on one global batch.
Rank 0 writes ``NAME.loss``, ``NAME.loss_OBJECTIVE``, ``NAME.grad.PARAM`` (whole gradients) and
``NAME.embed`` (``encode_image`` of the batch, through the FSDP forward method).
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))

from registry import Kind  # noqa: E402
from vlframe.api import build_model, build_tokenizer  # noqa: E402
from vlframe.config import files as configfile  # noqa: E402
from vlframe.data.loading import Collate, ImageTextSource, build_transform, train_loader  # noqa: E402
from vlframe.runs.formats import _apply  # noqa: E402
from vlframe.runtime import distributed  # noqa: E402
from vlframe.runtime.blocks import prepare_blocks  # noqa: E402

from training_configs import TINY, micro  # noqa: E402

OBJECTIVES = {  # the Table 8 ablations, as overrides of coca_tiny
    "contrastive": {"model.multimodal_decoder": None, "model.caption_pooler": None, "model.lm_head": None,
                    "model.objectives.caption": None},
    "captioning": {"model.contrastive_pooler": None, "model.image_projection": None,
                   "model.text_projection": None, "model.objectives.contrastive": None},
}


def parse(text: str) -> tuple[str, dict[str, str]]:
    name, _, rest = text.partition(":")
    return name, dict(kv.split("=", 1) for kv in rest.split(",") if kv)


def main(out: Path, workdir: Path, variants: list[str]) -> None:
    device = distributed.setup_from_env(group=True)
    rank, world = distributed.rank(), distributed.world_size()
    result: dict[str, torch.Tensor] = {}
    for text in variants:
        name, opts = parse(text)
        extra = dict(OBJECTIVES.get(opts.get("objectives", ""), {}))
        if opts.get("tied") == "1":
            extra["model.lm_head.tied"] = True
        strategy = {"type": opts.get("parallel", "ddp")}
        if "replicate" in opts:
            strategy["replicate"] = int(opts["replicate"])
        config, registry = configfile.load(TINY, {**micro(workdir), **extra, "train.parallel": strategy})
        catalog = registry.catalog
        dataset = catalog.build(Kind.DATASET, config.data.train, split="train")
        tokenizer = build_tokenizer(config, registry)
        tokenizer.train(dataset.captions(), workdir / f"tok{rank}")  # deterministic: equal on every rank
        torch.manual_seed(0)
        reference = build_model(config, registry=registry)
        weights = {k: v.detach().clone() for k, v in reference.state_dict().items()}
        parallel = catalog.build(Kind.PARALLEL, config.train.parallel)
        device = parallel.setup()
        model = parallel.parallelize(
            lambda dev: build_model(config, registry=registry, device=dev),
            lambda m: prepare_blocks(m, compile=opts.get("compile") == "1", activation_checkpointing=opts.get("ac", "none")),
            device=device, seed=0, precision="fp32")
        _apply(model, weights, strict=True)
        if opts.get("tied") == "1":  # still one parameter after sharding
            assert model.lm_head.proj.weight is model.text_decoder.token_embedding.weight
        source = ImageTextSource(dataset, build_transform(config.data, 64, train=True), seed=0, random_caption=True)
        loader = train_loader(source, Collate(tokenizer, config.model.context_length), config.data,
                              global_batch=config.train.batch_size, rank=rank, world=world, seed=0, start_step=0)
        batch = next(iter(loader))
        output = parallel.module(batch.images, batch.text, batch.text_mask)
        output.loss.backward()
        parallel.clip_grad_norm([p for p in model.parameters() if p.grad is not None], None)  # finishes the reduction
        result[f"{name}.loss"] = distributed.all_reduce_mean(output.loss).reshape(1)
        for key, value in output.losses.items():
            result[f"{name}.loss_{key}"] = distributed.all_reduce_mean(value).reshape(1)
        for pname, p in model.named_parameters():
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            result[f"{name}.grad.{pname}"] = grad.detach().clone()
        if output.image_embeds is not None:
            with torch.no_grad():
                embeds = model.encode_image(batch.images)
            result[f"{name}.embed"] = torch.cat([embeds] if world == 1 else _gather(embeds, world))
    if rank == 0:
        save_file({k: v.contiguous() for k, v in result.items()}, str(out))
    distributed.barrier()
    distributed.teardown()


def _gather(x: torch.Tensor, world: int) -> list[torch.Tensor]:
    parts = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(parts, x.contiguous())
    return parts


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
