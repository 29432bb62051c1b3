"""The command line of `python -m mmkernels.train`: every option, its default, and the resolved config.

Some defaults depend on the machine, so that the same command is a two-minute demo on a laptop
CPU and the speed proof on a GPU; `--help` says both values, and the resolved config is written to
runs/<name>/config.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, fields

# (CPU, GPU) defaults of the machine-dependent options
MACHINE_DEFAULTS = {
    "model": ("tiny", "base"),
    "steps": (600, 300),
    "batch_size": (64, 256),
    "precision": ("fp32", "bf16"),
    "workers": (0, 6),
}
# default learning rate per preset (AdamW, linear warm-up over 10% of the steps, then cosine to 0)
PRESET_LR = {"tiny": 2e-3, "small": 1e-3, "base": 5e-4}
PRECISIONS = ("bf16", "fp16", "fp32", "fp64")
WEIGHT_DECAY = 0.05

# options that may differ when a run is resumed: they change nothing the run computes
RESUMABLE_OVERRIDES = ("resume", "save_every", "workers", "allow_unpatched")


@dataclass
class TrainConfig:
    task: str
    loss: str
    model: str
    steps: int
    batch_size: int
    lr: float
    precision: str
    compile: bool
    baseline: str
    compare: bool
    max_batch: bool
    seed: int
    out: str
    resume: str | None
    save_every: int
    data: str | None
    tokenizer: str | None
    bad_data: str
    train_size: int
    eval_size: int
    mask_prob: float
    device: str
    workers: int
    allow_unpatched: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in (0, 1], got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _machine(name: str) -> str:
    cpu, gpu = MACHINE_DEFAULTS[name]
    return f"default: {gpu} on a GPU, {cpu} on CPU"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default; options whose default depends on the machine or the task say
    it in their own help (their parser default is None)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mmkernels.train",
        description=(
            "Train a vision-language model twice with the same seed, data and steps, once as the "
            "model's own code (baseline) and once patched with mmkernels, and write a report "
            "(runs/<name>/report.json, report.md, curves.png): samples/s, peak memory, loss curves, "
            "held-out retrieval R@1/R@5. Without --data it trains on procedural, seeded scenes of "
            "coloured shapes (no download). Under torchrun it runs DDP (gloo on CPU, NCCL on GPUs) "
            "with the exact global contrastive loss."
        ),
        formatter_class=_HelpFormatter,
    )
    what = p.add_argument_group("what to train")
    what.add_argument("--task", choices=("clip", "fusion"), default="clip",
                      help="clip: a CLIP/SigLIP dual encoder with a contrastive loss; fusion: LXMERT "
                           "with masked region modeling (feature regression, KL to the region class "
                           "distribution) and image-text matching over padded regions")
    what.add_argument("--loss", choices=("clip", "siglip"), default="clip",
                      help="clip task: CLIPModel with the softmax loss, or SiglipModel with the sigmoid loss")
    what.add_argument("--model", choices=("tiny", "small", "base"), default=None,
                      help=f"size preset; base = ViT-B/16 at 224 px with a 12-layer text tower "
                           f"(fusion: LXMERT-base) ({_machine('model')})")
    what.add_argument("--steps", type=_positive_int, default=None, help=f"optimizer steps per variant ({_machine('steps')})")
    what.add_argument("--batch-size", type=_positive_int, default=None,
                      help=f"global batch size, split over the processes of a torchrun run ({_machine('batch_size')})")
    what.add_argument("--lr", type=_positive_float, default=None,
                      help="peak AdamW learning rate, reached after a linear warm-up over 10%% of the steps, "
                           "then cosine decay (default: 2e-3 tiny, 1e-3 small, 5e-4 base)")
    what.add_argument("--precision", choices=PRECISIONS, default=None,
                      help=f"bf16/fp16: autocast with fp32 weights (fp16 with a gradient scaler); fp32; "
                           f"fp64 (for numerics checks) ({_machine('precision')})")
    what.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the weights, the data and the batch order")
    what.add_argument("--mask-prob", type=_probability, default=0.15,
                      help="fusion task: probability that each region is masked (at least one per image)")

    ab = p.add_argument_group("the A/B comparison")
    ab.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                    help="run the baseline and the mmkernels variant; --no-compare runs the mmkernels variant only")
    ab.add_argument("--baseline", choices=("eager", "compile"), default="eager",
                    help="the baseline: the model's own code as it is, or under torch.compile")
    ab.add_argument("--compile", action="store_true",
                    help="torch.compile every variant's model (the mmkernels variant too)")
    ab.add_argument("--allow-unpatched", action="store_true",
                    help="run even when mmkernels.patch swaps nothing in the model (both variants would run "
                         "the model's own code): the report then says so and shows no mmkernels/baseline "
                         "ratio. Without it such a run is refused before training, with the reasons")
    ab.add_argument("--max-batch", action="store_true",
                    help="GPU only: also search the largest batch each variant fits (one training step "
                         "per try, out-of-memory caught)")

    data = p.add_argument_group("data")
    data.add_argument("--data", metavar="DIR", default=None,
                      help="train on DIR's images and captions.jsonl/.csv (fusion: regions from an .npz "
                           "beside each image) (default: none, the synthetic scenes)")
    data.add_argument("--tokenizer", metavar="DIR", default=None,
                      help="a local Hugging Face tokenizer folder, as save_pretrained writes it: "
                           "tokenizer.json (a fast tokenizer) with its tokenizer_config.json, or the "
                           "vocabulary files of the tokenizer class its tokenizer_config.json names "
                           "(e.g. vocab.txt for BertTokenizer); it needs a padding token and an eos or sep "
                           "token; never downloaded (default: a word-level tokenizer built from the "
                           "training captions, the synthetic ones or those of --data)")
    data.add_argument("--bad-data", choices=("skip", "error"), default="skip",
                      help="what to do with bad pairs (missing or unreadable image, empty caption, bad "
                           "line or region file): report and skip them, or report them and refuse to start")
    data.add_argument("--train-size", type=_positive_int, default=8192, help="synthetic data: training scenes")
    data.add_argument("--eval-size", type=_positive_int, default=None,
                      help="held-out pairs for retrieval (default: 256 clip, 64 fusion; with --data at "
                           "most a fifth of the pairs)")
    data.add_argument("--workers", type=_non_negative_int, default=None,
                      help=f"processes that build batches ahead ({_machine('workers')})")

    run = p.add_argument_group("the run")
    run.add_argument("--out", metavar="DIR", default=None,
                     help="run directory (default: runs/<task>-<loss or fusion>-<model>-<date-time>)")
    run.add_argument("--resume", metavar="DIR", default=None,
                     help="continue the run in DIR from its last checkpoint, with its saved options "
                          "(default: none, a new run)")
    run.add_argument("--save-every", type=_non_negative_int, default=50,
                     help="write a checkpoint every N steps (atomically; 0: only at the end)")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="auto: the GPU when there is one (each torchrun process its LOCAL_RANK's)")
    return p


def explicit_options(argv: list[str]) -> set[str]:
    """The destinations of the options given on the command line (not left at their defaults)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def resolve(args: argparse.Namespace, cuda: bool) -> TrainConfig:
    """Fill the machine-dependent defaults and derived ones; check combinations."""
    values = vars(args).copy()
    for name, (cpu, gpu) in MACHINE_DEFAULTS.items():
        if values.get(name) is None:
            values[name] = gpu if cuda else cpu
    if values["lr"] is None:
        values["lr"] = PRESET_LR[values["model"]]
    if values["eval_size"] is None:
        values["eval_size"] = 64 if values["task"] == "fusion" else 256
    if values["out"] is None:
        kind = values["loss"] if values["task"] == "clip" else "fusion"
        values["out"] = os.path.join("runs", f"{values['task']}-{kind}-{values['model']}-{time.strftime('%Y%m%d-%H%M%S')}")
    if values["task"] == "fusion" and values["loss"] != "clip":
        raise ValueError("--loss applies to --task clip only; the fusion task's losses are fixed")
    return TrainConfig(**{f.name: values[f.name] for f in fields(TrainConfig)})


def save_config(cfg: TrainConfig, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cfg.to_json(), f, indent=2)
    os.replace(tmp, path)


def load_config(path: str) -> TrainConfig:
    with open(path) as f:
        return TrainConfig.from_json(json.load(f))


def resumed_config(saved: TrainConfig, args: argparse.Namespace, given: set[str]) -> TrainConfig:
    """The saved config of a resumed run; options given again must match it, except the harmless ones."""
    values = saved.to_json()
    clashes = []
    for name in sorted(given):
        value = getattr(args, name)
        if name in RESUMABLE_OVERRIDES:
            values[name] = value
        elif name in values and value != values[name]:
            clashes.append(f"--{name.replace('_', '-')} {value} (the run has {values[name]})")
    if clashes:
        raise ValueError("--resume continues a run with its own options; these differ: " + "; ".join(clashes))
    return TrainConfig.from_json(values)
