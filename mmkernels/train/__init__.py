"""The reference training loop: `python -m mmkernels.train` (see `--help`).

Trains a vision-language model twice with the same seed, data and steps, once as the model's own
code and once after `mmkernels.patch(model, global_loss=True)`, and reports samples/s, peak memory,
the loss curves and held-out retrieval side by side (refused, before training, when the patch swaps
nothing, unless --allow-unpatched). Files, one job each:

- options.py: the command line and the resolved config;  cli.py: the run from options to report;
- synthetic.py: the procedural scenes;  folder.py: --data DIR;  tokenizer.py;  examples.py;
  data.py: splits, batch order, collation;
- models.py: CLIP / SigLIP / LXMERT from presets;  tasks.py: each task's loss per variant and its
  retrieval scores;  retrieval.py: recall@K;
- loop.py: one variant's training run;  timing.py: samples/s with the variants interleaved;
  checkpoint.py: atomic saves, RNG states, the run's wall time across resumes;  ddp.py: processes;
  machine.py: machine info and peak memory;  maxbatch.py: --max-batch;  report.py: the report.
"""
from mmkernels.train.cli import main, run

__all__ = ["main", "run"]
