"""torchrun with gloo on the CPU: the same loss and gradients as one process on the same global batch."""

from __future__ import annotations

import pytest

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from conftest import ROOT, clean_env
from numerics import assert_all_close, assert_close

PROBE = ROOT / "tests" / "ddp_probe.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**clean_env(), **(env or {})}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path: Path) -> None:
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f"world{nproc}.pt"
        proc = torchrun(nproc, str(PROBE), str(out), str(tmp_path / f"work{nproc}"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[nproc] = torch.load(out, weights_only=False)
    one, two = results[1], results[2]
    assert (one["world"], two["world"]) == (1, 2)
    assert_close(two["loss"], one["loss"], what="loss")
    for name in one["losses"]:
        assert_close(two["losses"][name], one["losses"][name], what=name)
    assert_all_close(two["grads"], one["grads"])
    # The contrastive loss really spans ranks: its gradient reaches the temperature on both.
    assert one["grads"]["objectives.contrastive.log_inv_temperature"].abs() > 0
