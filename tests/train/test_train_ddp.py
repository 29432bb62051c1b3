"""`torchrun --nproc_per_node=2 -m mmkernels.train`: DDP over gloo on 127.0.0.1 gives the losses of one
process training on the global batch (the exact global contrastive loss, the single-process update);
the mmkernels variant's loss is the patched model's own (`mmkernels.patch(model, global_loss=True)`)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from mmkernels.train import run
from toolkit import assert_within_rule, fresh_seed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), TRITON_INTERPRET="0",
               OMP_NUM_THREADS="1")
    env.pop("MMKERNELS_POISON_OUTPUTS", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "mmkernels.train", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_two_gloo_processes_give_the_single_process_losses(loss, tmp_path, reference_path):
    # an odd global batch: the ranks hold 8 and 7 rows
    args = ["--loss", loss, "--model", "tiny", "--steps", "6", "--batch-size", "15", "--eval-size", "8",
            "--train-size", "64", "--seed", str(fresh_seed() % 10_000), "--save-every", "0"]
    done = _torchrun(args + ["--out", str(tmp_path / "ddp")])
    assert done.returncode == 0, done.stderr[-4000:]
    with open(tmp_path / "ddp" / "report.json") as f:
        ddp = json.load(f)
    assert ddp["machine"]["processes"] == 2
    # the mmkernels variant's loss is the patched model's own, over the global batch
    assert "losses: global loss over the process group (world 2)" in ddp["variants"]["mmkernels"]["patched"]
    single = run(args + ["--out", str(tmp_path / "single")])
    oracle = run(args + ["--no-compare", "--precision", "fp64", "--out", str(tmp_path / "fp64")])
    truth = torch.tensor(oracle["variants"]["mmkernels"]["losses"], dtype=torch.float64)
    eager = torch.tensor(single["variants"]["baseline"]["losses"])
    for variant in ("baseline", "mmkernels"):
        got = torch.tensor(ddp["variants"][variant]["losses"])
        assert got.shape == (6,)
        assert_within_rule(f"{variant} on 2 ranks", got, eager, truth, torch.float32)
    # negative control: the same losses one step out of line fail the comparison
    with pytest.raises(AssertionError):
        assert_within_rule("shifted", torch.cat([got[1:], got[-1:]]), eager, truth, torch.float32)
