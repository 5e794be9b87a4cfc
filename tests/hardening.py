"""Helpers of the hardening tests: crafted files (a pickle that runs code, a decompression bomb),
a trained micro run to derive checkpoints from, and the vlframe command in a process of its own."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

from conftest import clean_env, run_main
from training_configs import TINY, micro, sets

VLFRAME = Path(sys.executable).with_name("vlframe")

EVIL = """
import sys, torch
class Evil:
    def __reduce__(self):
        return (exec, ("open(%r, 'w').write('code ran')" % sys.argv[2],))
torch.save({"step": 3, "optimizer": {}, "scheduler": {}, "payload": Evil()}, sys.argv[1])
"""


def write_evil_pickle(path: Path, marker: Path) -> Path:
    """A torch file whose unpickling writes ``marker`` (written by a separate process, so that
    the class it pickles is not importable here)."""
    subprocess.run([sys.executable, "-c", EVIL, str(path), str(marker)], check=True, env=clean_env())
    assert not marker.exists()
    return path


def evil_checkpoint(good: Path, where: Path, marker: Path) -> Path:
    """A copy of checkpoint ``good`` whose state is a code-running pickle (the earlier format)."""
    shutil.copytree(good, where)
    for name in ("state.json", "state.safetensors"):
        (where / name).unlink()
    write_evil_pickle(where / "state.pt", marker)
    return where


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A real decompression bomb: a valid 1-bit PNG of side x side pixels (400 Mpixels, 1.2 GB as
    RGB), a few kB on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = (b"\x00" + b"\x00" * ((side + 7) // 8)) * side
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))
    return path


def train_micro(tmp_path: Path, run: Path, **extra) -> tuple[int, str, str]:
    """``vlframe train`` of the micro config into ``run`` (in this process); (code, out, err)."""
    result = run_main("train", str(TINY), "--run-dir", str(run), *sets(micro(tmp_path, **extra)))
    return result.code, result.out, result.err


def popen_vlframe(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([str(VLFRAME), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**clean_env(), "PYTHONUNBUFFERED": "1", **(env or {})}, **kwargs)


def error_lines(err: str) -> list[str]:
    """The lines of stderr that are not MLflow's own log lines."""
    return [line for line in err.splitlines() if line.strip() and " INFO mlflow" not in line
            and "WARNING mlflow" not in line]
