"""FSDP2 on the CPU with gloo: equal to one process, sharded checkpoints across world sizes, export,
activation checkpointing and compile, and the errors of settings that cannot work."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, clean_env, run_main
from numerics import assert_all_close, assert_close
from vlframe.inference.trained import load_trained
from vlframe.runs import checkpoint
from test_distributed import _free_port, torchrun
from training_configs import TINY, micro, sets

PROBE = ROOT / "tests" / "fsdp_probe.py"
pytestmark = pytest.mark.slow


def _compare(a: dict, b: dict, left: str, right: str) -> int:
    keys = [k.removeprefix(f"{left}.") for k in a if k.startswith(f"{left}.")]
    assert keys and all(f"{right}.{k}" in b for k in keys), (left, right)
    for key in keys:  # one global batch: a forward (losses, embeddings)...
        if not key.startswith("grad."):
            assert_close(b[f"{right}.{key}"], a[f"{left}.{key}"], what=f"{left} vs {right}: {key}")
    grads = [k for k in keys if k.startswith("grad.")]  # ...and a backward: the gradients, at their shared scale
    assert_all_close({k: b[f"{right}.{k}"] for k in grads}, {k: a[f"{left}.{k}"] for k in grads},
                     what=f"{left} vs {right}")
    return len(grads)


@pytest.fixture(scope="module")
def probes(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    tmp = tmp_path_factory.mktemp("fsdp_probe")
    two = torchrun(2, str(PROBE), str(tmp / "two.st"), str(tmp / "w2"), "coca:parallel=fsdp",
                   "tied:parallel=fsdp,tied=1", "con:parallel=fsdp,objectives=contrastive",
                   "cap:parallel=fsdp,objectives=captioning", "hsdp:parallel=fsdp,replicate=2",
                   "checkpointed:parallel=fsdp,ac=full")
    assert two.returncode == 0, two.stderr[-3000:]
    one = torchrun(1, str(PROBE), str(tmp / "one.st"), str(tmp / "w1"), "coca:", "tied:tied=1",
                   "con:objectives=contrastive", "cap:objectives=captioning", "full:ac=full", "selective:ac=selective",
                   "fsdp1:parallel=fsdp,ac=selective,compile=1")
    assert one.returncode == 0, one.stderr[-3000:]
    return load_file(str(tmp / "one.st")), load_file(str(tmp / "two.st"))


@pytest.mark.parametrize("variant", ["coca", "tied", "con", "cap"])
def test_two_fsdp_ranks_equal_one_process(probes: tuple[dict, dict], variant: str) -> None:
    """Losses, every whole gradient and encode_image of the sharded model, on one global batch:
    CoCa, CoCa with a tied LM head, and the contrastive-only and captioning-only ablations."""
    one, two = probes
    grads = _compare(one, two, variant, variant)
    assert grads > 40
    assert f"{variant}.embed" in one or variant == "cap"


def test_hybrid_sharding_and_checkpointing_under_fsdp_equal_one_process(probes: tuple[dict, dict]) -> None:
    one, two = probes
    _compare(one, two, "coca", "hsdp")  # a 2x1 (replicate x shard) mesh
    _compare(one, two, "coca", "checkpointed")  # activation checkpointing composed with sharding


@pytest.mark.parametrize("variant", ["full", "selective", "fsdp1"])  # fsdp1: sharded, checkpointed and compiled
def test_activation_checkpointing_and_compile_keep_losses_and_gradients(probes: tuple[dict, dict], variant: str) -> None:
    one, _ = probes
    _compare(one, one, "coca", variant)
    # The temperature (a 0-d parameter FSDP cannot shard) still learns.
    assert one[f"{variant}.grad.objectives.contrastive.log_inv_temperature"].abs() > 0


def test_every_block_compiles_as_one_graph_forward_and_backward() -> None:
    """fullgraph=True raises on any graph break: each kind of CoCa block (vision, causal text,
    multimodal with cross-attention) compiles whole, and its gradients equal eager."""
    from vlframe.api import build_model
    from vlframe.config import files as configfile

    config, registry = configfile.load(TINY, micro(Path("/nonexistent")))
    torch.manual_seed(0)
    model = build_model(config, registry=registry)
    kinds = {"image_encoder": None, "text_decoder": None, "multimodal_decoder": None}
    for name in kinds:
        kinds[name] = getattr(model, name).blocks[0]
    x = torch.randn(2, 9, 64, requires_grad=True)
    context = torch.randn(2, 8, 64)
    for name, block in kinds.items():
        kwargs = {"context": context} if name == "multimodal_decoder" else {}
        eager = block(x, **kwargs)
        eager.sum().backward()
        expected = x.grad.clone()
        x.grad = None
        compiled = torch.compile(block, fullgraph=True)
        out = compiled(x, **kwargs)
        out.sum().backward()
        assert_close(out, eager, depth="layer", what=name)
        assert_close(x.grad, expected, depth="backward", what=name)
        x.grad = None


# -- training, sharded checkpoints, export ------------------------------------------------------


def _losses(text: str) -> dict[int, float]:
    return {int(m[1]): float(m[2]) for m in re.finditer(r"^step (\d+)/\d+ loss ([\d.]+)", text, re.M)}


def _train(tmp: Path, nproc: int, run: Path, *extra: str, **overrides) -> subprocess.CompletedProcess:
    args = ["-m", "vlframe", "train", str(TINY), *sets(micro(tmp, **{"train.parallel": "fsdp", **overrides})), *extra]
    if not any(a == "--resume" for a in extra):
        args += ["--run-dir", str(run)]
    if nproc == 0:  # a plain process: vlframe makes its own one-rank group
        env = {**clean_env(), "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    return torchrun(nproc, *args)


#: The two-rank run ties its LM head to the token embedding: one tensor under two names, which the
#: sharded format stores once (safetensors keeps no two names for one tensor).
TIED = {"model.lm_head.tied": True}


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, float]]:
    tmp = tmp_path_factory.mktemp("fsdp_train")
    run = tmp / "two"
    proc = _train(tmp, 2, run, **TIED)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = _losses(proc.stderr)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6], proc.stderr[-2000:]
    assert "FSDP2: 4 units on a 2 mesh" in proc.stderr
    return run, losses


def _branch(run: Path, where: Path, step: int) -> Path:
    shutil.copytree(run, where)
    for ckpt in (where / "checkpoints").glob("step_*"):
        if int(ckpt.name[5:]) > step:
            shutil.rmtree(ckpt)
    (where / ".lock").unlink(missing_ok=True)
    return where


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_a_two_rank_sharded_checkpoint_resumes_on_one_rank(two_rank_run, tmp_path: Path, parallel: str) -> None:
    run, uninterrupted = two_rank_run
    ckpt = run / "checkpoints" / "step_000003"
    assert sorted(p.name for p in (ckpt / "sharded").iterdir()) == [
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    assert not (ckpt / "model.safetensors").exists()
    assert checkpoint.read_state(ckpt)["tied"] == {"model.lm_head.proj.weight": "model.text_decoder.token_embedding.weight"}
    branch = _branch(run, tmp_path / "branch", 3)
    proc = _train(tmp_path, 0, branch, "--resume", str(branch), **TIED, **{"train.parallel": parallel})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "differs" not in proc.stderr
    assert ("was written under train.parallel fsdp; the run goes on under ddp" in proc.stderr) == (parallel == "ddp")
    resumed = _losses(proc.stderr)
    assert sorted(resumed) == [4, 5, 6]
    for step, loss in resumed.items():  # another world size: the same samples, reduced in another order
        assert_close(loss, uninterrupted[step], depth="steps", printed=1e-3, what=f"step {step}")


def test_a_one_rank_sharded_checkpoint_resumes_on_two_ranks(tmp_path: Path) -> None:
    run = tmp_path / "one"
    proc = _train(tmp_path, 0, run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    uninterrupted = _losses(proc.stderr)
    branch = _branch(run, tmp_path / "branch", 3)
    proc = _train(tmp_path, 2, branch, "--resume", str(branch))
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = _losses(proc.stderr)
    assert sorted(resumed) == [4, 5, 6]
    for step, loss in resumed.items():
        assert_close(loss, uninterrupted[step], depth="steps", printed=1e-3, what=f"step {step}")
    assert len(list((branch / "checkpoints" / "step_000006" / "sharded").iterdir())) == 2


def test_export_writes_one_model_file_that_every_command_loads(two_rank_run, tmp_path: Path) -> None:
    from PIL import Image

    run, _ = two_rank_run
    out = tmp_path / "exported"
    # In this process (the same entry point): reading shards needs no process group.
    proc = run_main("export", str(run), "--out", str(out))
    assert proc.code == 0, proc.err[-2000:]
    assert (out / "model.safetensors").is_file() and not (out / "sharded").exists()
    weights = load_file(str(out / "model.safetensors"))
    tied = [k for k in weights if k in ("text_decoder.token_embedding.weight", "lm_head.proj.weight")]
    assert len(tied) == 1 and weights[tied[0]].shape[0] == 512  # the tied pair, stored once
    for source in (run, out):  # loaded back, still one tensor
        model = load_trained(source).model
        assert model.lm_head.proj.weight is model.text_decoder.token_embedding.weight
    image = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    sharded, whole = run_main("caption", str(run), str(image)), run_main("caption", str(out), str(image))
    assert sharded.code == whole.code == 0, sharded.err[-1000:] + whole.err[-1000:]
    assert sharded.out == whole.out and sharded.out.strip()
    again = run_main("export", str(run), "--out", str(out))
    assert again.code == 2 and again.err.strip().splitlines()[-1].startswith("error: --out ")


def test_a_pickle_beside_the_shards_is_never_read(two_rank_run, tmp_path: Path) -> None:
    """DCP's own metadata file is a pickle; vlframe's sharded format never reads one."""
    run, _ = two_rank_run
    branch = _branch(run, tmp_path / "branch", 3)
    marker = tmp_path / "marker"
    # DCP's default reader would pickle.load this file: a plain pickle that runs code.
    evil = ("import pickle, sys\nclass Evil:\n    def __reduce__(self):\n        return (exec, (\"open(%r, 'w')"
            ".write('code ran')\" % sys.argv[2],))\nopen(sys.argv[1], 'wb').write(pickle.dumps(Evil()))\n")
    target = branch / "checkpoints" / "step_000003" / "sharded" / ".metadata"
    subprocess.run([sys.executable, "-c", evil, str(target), str(marker)], check=True, env=clean_env())
    assert target.stat().st_size > 0 and not marker.exists()
    proc = _train(tmp_path, 0, branch, "--resume", str(branch), **TIED)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not marker.exists()


def test_a_kill_mid_save_leaves_a_resumable_checkpoint(tmp_path: Path) -> None:
    """SIGKILL to every rank while they checkpoint every step: the newest complete checkpoint resumes."""
    run = tmp_path / "killed"
    env = {**clean_env(), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "vlframe", "train", str(TINY), "--run-dir", str(run),
           *sets(micro(tmp_path, **{"train.parallel": "fsdp", "train.steps": 200, "train.checkpoint_every": 1}))]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not (run / "checkpoints" / "step_000004").exists():
        time.sleep(0.05)
    import psutil

    ranks = psutil.Process(proc.pid).children(recursive=True)  # torchrun starts ranks in sessions of their own
    os.killpg(proc.pid, signal.SIGKILL)
    for child in ranks:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    proc.wait(timeout=60)
    psutil.wait_procs(ranks, timeout=60)
    assert (run / "checkpoints" / "step_000004").exists()
    proc = _train(tmp_path, 0, run, "--resume", str(run), **{"train.steps": 8, "train.checkpoint_every": 4})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr
    assert not list((run / "checkpoints").glob(".step_*"))  # the partial one was swept
    assert (run / "checkpoints" / "step_000008" / "sharded").is_dir()


def test_settings_that_cannot_work_are_one_line(tmp_path: Path) -> None:
    proc = _train(tmp_path, 0, tmp_path / "offload", **{"train.parallel": {"type": "fsdp", "cpu_offload": True}})
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "train.parallel.cpu_offload" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "offload").exists()


def test_a_part_without_reset_parameters_is_named(tmp_path: Path) -> None:
    code = """
import torch
from torch import nn
from registry import ComponentError, Kind, Registry
from vlframe.runtime import distributed

class Part(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.blocks = nn.ModuleList([nn.Linear(4, 4)])
class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.part = Part()
    def blocks(self):
        return list(self.part.blocks)
catalog = Registry.discover().catalog
strategy = catalog.build(Kind.PARALLEL, catalog.validate(catalog.get(Kind.PARALLEL, "fsdp").spec.config, {"type": "fsdp"}))
device = strategy.setup()
try:
    strategy.parallelize(lambda dev: Model().to(dev) if dev else Model(), lambda model: None, device=device, seed=0,
                         precision="fp32")
except ComponentError as exc:
    print(exc)
distributed.teardown()
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=600)
    assert "no reset_parameters() initialised part.scale: give Part" in proc.stdout, proc.stdout + proc.stderr[-2000:]
