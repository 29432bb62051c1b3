"""`python -m mmkernels.train`: the default A/B on a tiny preset, the report, the loss curves under
the numerics rule (docs/design.md), learning (held-out retrieval well above chance), and the command line's checks.

The loop runs mmkernels' CPU reference path (TRITON_INTERPRET=0): interpreted Triton kernels would
take minutes per training step. The kernels themselves are proven op by op in their own tests.
"""
from __future__ import annotations

import json
import re
import time

import pytest
import torch

from mmkernels.train import run
from mmkernels.train.cli import main
from mmkernels.train.maxbatch import largest_batch
from mmkernels.train.options import build_parser, explicit_options
from mmkernels.train.retrieval import recall_at_k
from toolkit import assert_within_rule, fresh_seed

# 150 steps of batch 64 on the tiny preset at lr 1e-3: the loss falls from log(64) ≈ 4.16 to about 2.0
# and held-out R@1 over 64 pairs reaches about 20 times chance (1/64); over 40 seeds the worst reached
# 5x chance at R@1 with the loss at 0.71 of its start; seed 3595 reaches 2x (loss at 0.68). (At the tiny
# preset's default 2e-3 this short schedule warms up in 15 steps and 3 seeds in 40 collapsed to a
# constant embedding, the loss flat at log(64), R@1 at chance: seeds 416, 1674, 4363, and 236 in CI.
# The default 600-step schedule warms up over 60 steps and learned on all 10 seeds tried, those
# four included: R@1 80-88% over 256 pairs.)
AB = ["--model", "tiny", "--steps", "150", "--batch-size", "64", "--eval-size", "64", "--save-every", "0",
      "--lr", "1e-3"]


def _curve(report, variant):
    return torch.tensor(report["variants"][variant]["losses"], dtype=torch.float64)


def test_default_command_ab_report_and_learning(tmp_path, reference_path):
    seed = str(fresh_seed() % 10_000)
    out = tmp_path / "ab"
    report = run(AB + ["--seed", seed, "--out", str(out)])

    # the files exist and parse; the report on disk is the one returned
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["variants"].keys() == {"baseline", "mmkernels"}
    assert on_disk["ratios"]["samples_per_s"] == pytest.approx(report["ratios"]["samples_per_s"])
    md = (out / "report.md").read_text()
    assert "| samples/s" in md and "R@1 image→text" in md and "curves.png" in md
    assert "reference path" in md  # on the CPU the report says the speed is not the point
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    machine = on_disk["machine"]
    assert machine["torch"] == torch.__version__ and machine["cpu"] and machine["gpu"] is None

    for name in ("baseline", "mmkernels"):
        v = report["variants"][name]
        assert len(v["losses"]) == 150 and len(v["step_seconds"]) == 150
        assert v["samples_per_s"] > 0 and v["peak_memory_bytes"] > 2**20
        assert v["memory_kind"].startswith("peak RSS")
        # learning: the loss falls and held-out retrieval is far above chance, both directions
        assert v["final_loss"] < 0.85 * v["losses"][0], (name, v["losses"][0], v["final_loss"])
        r = v["retrieval"]
        # chance is 1/64, more where held-out scenes share a caption (seed 9001: 33/2048)
        assert r["n"] == 64 and 1 / 64 <= r["chance_r1"] < 2 / 64
        # above chance in both directions: R@5 at 3x its chance (15 of 64 where chance expects 5:
        # 4.7 standard deviations), R@1 at 2x (3 of 64 hits is too few to hold a slow seed to more:
        # seed 3595 reaches 2 and 3 of 64 at R@1, 29 and 26 at R@5, its loss at 0.68 of its start)
        for key, times in (("i2t_r1", 2), ("t2i_r1", 2), ("i2t_r5", 15), ("t2i_r5", 15)):
            assert r[key] >= times * r["chance_r1"], (name, key, r)
        assert r["i2t_r5"] >= r["i2t_r1"] and r["t2i_r5"] >= r["t2i_r1"]
    patched = report["variants"]["mmkernels"]["patched"]
    assert patched.startswith("mmkernels.patch(CLIPModel): ") and int(patched.split(": ")[1].split()[0]) > 0

    # The two curves agree step by step under the numerics rule (docs/design.md) (the float64 run is the oracle, the
    # baseline is the eager error) over the first 10 steps. Past those, Adam amplifies float32
    # rounding chaotically (a parameter whose gradient is near 0 gets an update of ±lr by the sign
    # of its rounding), so which float32 run lies nearer the float64 one is chance (at lr 2e-3, by
    # step 150 the ratio of the two runs' errors ranged from 0.05 to 22 over 6 seeds). Past step 10
    # the two float32 curves are held to each other, within the larger of a fixed bound and 4x how
    # far float32 itself (the baseline) strays from the float64 run on this seed. Measured at lr
    # 1e-3 over 10 seeds: the two float32 curves within 2.7e-4 per step and 5.8e-5 on the mean of
    # the last 50 steps, the baseline within 1.5e-4 of float64. A loss spike amplifies every
    # rounding difference: at lr 2e-3, seed 1857 spiked at step 44 (3.33 -> 5.18), the baseline
    # strayed 5.3e-3 from float64 (1.5e-3 on the tail mean), ours 1.3e-2 in the same direction, the
    # two float32 runs 7.3e-3 (2.3e-3) apart, and CI failed on a fixed tail bound of 1e-3.
    oracle = run(AB + ["--seed", seed, "--no-compare", "--precision", "fp64", "--out", str(tmp_path / "fp64")])
    truth = _curve(oracle, "mmkernels")
    base, ours = _curve(report, "baseline"), _curve(report, "mmkernels")
    k = 10
    assert_within_rule("loss curve, first 10 steps", ours[:k], base[:k], truth[:k], torch.float32)
    # negative control: a curve one step out of line fails the same comparison
    with pytest.raises(AssertionError):
        assert_within_rule("shifted loss curve", ours[1:k + 1], base[:k], truth[:k], torch.float32)
    chaos = float(((base - truth).abs() / truth.abs()).max())  # how far float32 strays on this seed
    gap = (ours - base).abs() / base.abs()
    step_bound = max(0.02, 4 * chaos)
    assert float(gap.max()) <= step_bound, (
        f"step {int(gap.argmax())}: curves {float(gap.max()):.3e} apart (relative), bound {step_bound:.3e}")
    tail_gap = float(abs(ours[-50:].mean() - base[-50:].mean()) / base[-50:].mean())
    tail_bound = max(1e-3, 4 * chaos)
    assert tail_gap <= tail_bound, (
        f"mean loss over the last 50 steps {tail_gap:.2e} apart (relative), bound {tail_bound:.2e}; "
        f"the baseline strays {chaos:.2e} from the float64 run")


def test_resume_refuses_other_options_and_existing_runs(tmp_path, reference_path, capsys):
    out = tmp_path / "run"
    tiny = ["--steps", "2", "--batch-size", "8", "--eval-size", "8", "--train-size", "16", "--no-compare",
            "--max-batch"]
    assert main(tiny + ["--out", str(out)]) == 0
    assert "--max-batch is GPU-only" in capsys.readouterr().err
    result = json.loads((out / "report.json").read_text())["variants"]["mmkernels"]
    assert result["max_batch"] is None and result["max_batch_note"].startswith("GPU only")
    assert main(tiny + ["--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["--resume", str(out), "--lr", "0.5"]) == 2
    assert "--lr 0.5 (the run has 0.002)" in capsys.readouterr().err
    assert main(["--resume", str(tmp_path / "nothing")]) == 2
    assert "no run there" in capsys.readouterr().err
    # a finished run resumes to the same report
    assert main(["--resume", str(out)]) == 0


def test_help_documents_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for option in ("--steps", "--batch-size", "--lr", "--precision", "--compile", "--seed", "--out", "--no-compare",
                   "--task", "--loss", "--model", "--baseline", "--max-batch", "--data", "--tokenizer",
                   "--bad-data", "--resume", "--save-every"):
        assert option in text, option
    parser = build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest != "help":
            assert "default" in formatter._get_help_string(action), action.dest


def test_explicit_options_and_bad_values(capsys):
    assert explicit_options(["--steps", "3", "--no-compare"]) == {"steps", "compare"}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--steps", "0"])
    assert "expected an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["--task", "fusion", "--loss", "siglip"]) == 2
    assert "--loss applies to --task clip only" in capsys.readouterr().err
    assert main(["--data", "somewhere"]) == 2
    assert "expected --data to be a directory" in capsys.readouterr().err


class _FakeTrainer:
    """Runs out of memory above `limit` rows, as a GPU would."""

    def __init__(self, limit):
        self.limit, self.tried, self.closed = limit, [], False
        self.optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)

    def step(self, batch, step):
        rows = batch["x"].shape[0]
        self.tried.append(rows)
        if rows > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")

    def close(self):
        self.closed = True


@pytest.mark.parametrize("limit", [8, 1000, 4095])
def test_max_batch_search_finds_the_limit_within_a_thirty_second(limit, monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda *a: None)
    trainer = _FakeTrainer(limit)
    best, note = largest_batch(lambda: trainer, {"x": torch.arange(8.0)[:, None]}, start=8)
    assert limit - limit // 32 <= best <= limit and str(best) in note and trainer.closed
    assert max(trainer.tried) <= 2 * limit  # one doubling past the limit, no more
    none, note = largest_batch(lambda: _FakeTrainer(4), {"x": torch.zeros(8, 1)}, start=8)
    assert none is None and "not even" in note


def test_recall_counts_identical_captions_as_one_class():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.2, 0.0], [0.0, 0.1, 0.9]])
    r = recall_at_k(scores, ["a", "b", "c"])
    assert r["i2t_r1"] == pytest.approx(1 / 3) and r["t2i_r1"] == pytest.approx(1 / 3)
    # images 0 and 1 share a caption: retrieving either one's caption is right
    r = recall_at_k(scores, ["a", "a", "c"])
    assert r["i2t_r1"] == pytest.approx(1.0) and r["chance_r1"] == pytest.approx((2 + 2 + 1) / 9)
    with pytest.raises(ValueError, match="N captions"):
        recall_at_k(scores, ["a"])


def test_resume_sets_up_the_device_the_run_was_saved_with(tmp_path, reference_path, monkeypatch):
    from mmkernels.train import ddp

    out = tmp_path / "run"
    tiny = ["--steps", "1", "--batch-size", "4", "--eval-size", "4", "--train-size", "8", "--no-compare"]
    assert main(tiny + ["--device", "cpu", "--out", str(out)]) == 0
    devices, setup = [], ddp.setup
    monkeypatch.setattr(ddp, "setup", lambda device="auto", **kw: devices.append(device) or setup(device, **kw))
    # the wall time counts the whole run: the time saved by the first process, plus the resumed part
    elapsed = json.loads((out / "elapsed.json").read_text())["seconds"]
    assert 0 < elapsed <= json.loads((out / "report.json").read_text())["wall_seconds"]
    (out / "elapsed.json").write_text(json.dumps({"seconds": 1000.0}))
    started = time.perf_counter()
    assert main(["--resume", str(out)]) == 0
    resumed = time.perf_counter() - started
    assert 1000 < json.loads((out / "report.json").read_text())["wall_seconds"] < 1000 + resumed
    assert re.search(r"Wall time: 1\d{3} s", (out / "report.md").read_text())
    # on a GPU machine "auto" would resume a CPU run on the GPU
    assert devices == ["cpu"]


def test_a_batch_larger_than_the_training_split_is_refused_before_the_run_starts(tmp_path, reference_path, capsys):
    out = tmp_path / "run"
    assert main(["--steps", "1", "--batch-size", "16", "--train-size", "8", "--eval-size", "4", "--out", str(out)]) == 2
    assert "fewer than --batch-size 16" in capsys.readouterr().err
    assert not out.exists()  # no run directory that a corrected command would have to --resume


TWO_STEPS = ["--model", "tiny", "--steps", "2", "--batch-size", "8", "--train-size", "16", "--eval-size", "16"]


def test_a_run_that_did_not_learn_says_so_and_the_variants_are_timed_interleaved(tmp_path, reference_path):
    out = tmp_path / "run"
    report = run(TWO_STEPS + ["--out", str(out)])
    md = (out / "report.md").read_text()
    head = md.split("| |")[0]  # above the table
    for name in ("baseline", "mmkernels"):
        assert report["learned"][name] is False
        assert f"**Warning:** {name} did not learn: held-out R@1" in head
    on_disk = json.loads((out / "report.json").read_text())
    assert len(on_disk["warnings"]) == 2

    # the timed steps alternate in blocks between the variants, reversing the order each round
    timing = on_disk["throughput"]
    schedule = timing["schedule"]
    rounds, block = timing["rounds"], timing["block"]
    assert rounds >= 2 and len(schedule) == 2 * rounds * block
    starts = [start for _, _, start, _ in schedule]
    assert starts == sorted(starts)
    runs = [schedule[0][0]]
    for variant, _, _, _ in schedule[1:]:
        if variant != runs[-1]:
            runs.append(variant)
    assert len(runs) == 2 * rounds - (rounds - 1)  # b m | m b | b m ...: the turns at round ends merge
    for variant in ("baseline", "mmkernels"):
        mine = [start for v, _, start, _ in schedule if v == variant]
        others = [start for v, _, start, _ in schedule if v != variant]
        assert min(others) < max(mine) and min(mine) < max(others)  # each one's time span overlaps the other's
        v = report["variants"][variant]
        assert v["samples_per_s_p20"] <= v["samples_per_s"] <= v["samples_per_s_p80"]
    ratio = timing["ratio"]
    assert ratio["p20"] <= ratio["p80"] and report["ratios"]["samples_per_s"] == pytest.approx(ratio["median"])
    # on the CPU the ratio's own cell says it is no speed claim
    speed_row = next(line for line in md.splitlines() if line.startswith("| samples/s"))
    assert "interleaved" in speed_row and "not a speed claim" in speed_row.split("|")[-2]


def _patch_nothing(monkeypatch):
    """mmkernels.patch as on a transformers release it was not tested on: nothing swapped, each module skipped."""
    import mmkernels
    from mmkernels.integrations.patching import PatchHandle, SkippedItem

    def patch(model, **kwargs):
        handle = PatchHandle(model, attention=True, losses=True, keep_logits=True, strict=False)
        item = SkippedItem(path="text_model.encoder.layers.0.self_attn", kind="attention",
                           reason="transformers 9.9 changed CLIPAttention.forward")
        handle._skipped[(item.path, item.kind)] = item
        return handle

    monkeypatch.setattr(mmkernels, "patch", patch)


def test_a_run_with_nothing_patched_is_refused_before_training_unless_allowed(tmp_path, reference_path,
                                                                              monkeypatch, capsys):
    _patch_nothing(monkeypatch)
    out = tmp_path / "run"
    args = ["--model", "tiny", "--steps", "1", "--batch-size", "4", "--train-size", "8", "--eval-size", "4"]
    assert main(args + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "mmkernels.patch swapped nothing" in err and "--allow-unpatched" in err
    assert "text_model.encoder.layers.0.self_attn attention: transformers 9.9 changed CLIPAttention.forward" in err
    assert not out.exists()  # refused before any run directory or checkpoint

    assert main(args + ["--allow-unpatched", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["unpatched"] is True and "ratios" not in report
    assert report["variants"]["mmkernels"]["patched_count"] == 0
    md = (out / "report.md").read_text()
    assert md.split("\n")[2].startswith("> **Warning:** mmkernels.patch swapped nothing in this run")
    assert "| mmkernels / baseline |" not in md and "×" not in md  # no ratio column
