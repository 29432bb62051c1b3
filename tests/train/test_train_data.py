"""The loop's data: `--data DIR` folders (bad pairs reported with file and line, skipped or refused),
region files for the fusion task, the tokenizers, the synthetic scenes and the batch order."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmkernels.train import run, synthetic
from mmkernels.train.cli import main
from mmkernels.train.data import BatchOrder, rank_slice
from mmkernels.train.folder import DataError, FolderPairs
from mmkernels.train.tokenizer import caption_tokenizer, encode, load_tokenizer, word_level_tokenizer
from toolkit import fresh_seed

N_GOOD = 10


def _write_folder(root, seed: int, fusion: bool = False):
    """N_GOOD good pairs (synthetic scenes saved as PNGs) and four bad lines; returns the bad lines."""
    from PIL import Image

    scenes = synthetic.SyntheticPairs(N_GOOD, seed, "train", "clip", image_size=24)
    regions = synthetic.SyntheticPairs(N_GOOD, seed, "train", "fusion", max_regions=6, region_dim=12)
    (root / "img").mkdir(parents=True)
    lines = []
    for i in range(N_GOOD):
        Image.fromarray(scenes[i].image.permute(1, 2, 0).numpy()).save(root / "img" / f"{i}.png")
        lines.append(json.dumps({"image": f"img/{i}.png", "caption": scenes[i].caption}))
        if fusion:
            r = regions[i].regions
            np.savez(root / "img" / f"{i}.npz", features=r.features.numpy(), boxes=r.boxes.numpy(),
                     class_probs=r.class_probs.numpy())
    (root / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is no image")
    (root / "img" / "blank.png").write_bytes((root / "img" / "0.png").read_bytes())
    bad = {
        N_GOOD + 1: json.dumps({"image": "img/broken.png", "caption": "a broken image"}),
        N_GOOD + 2: json.dumps({"image": "img/blank.png", "caption": "   "}),
        N_GOOD + 3: json.dumps({"image": "img/missing.png", "caption": "a missing image"}),
        N_GOOD + 4: '{"image": "img/1.png", "caption": ',
    }
    if fusion:
        np.savez(root / "img" / "broken.npz", features=np.ones((2, 12), np.float32))  # no boxes
        np.savez(root / "img" / "blank.npz", features=np.ones((2, 12)), boxes=np.zeros((2, 4)))
    (root / "captions.jsonl").write_text("\n".join(lines + list(bad.values())) + "\n")
    return bad


def _tokenizer_dir(tmp_path):
    path = tmp_path / "tokenizer"
    word_level_tokenizer(synthetic.vocabulary()).save_pretrained(str(path))
    return str(path)


def test_data_folder_trains_and_reports_bad_pairs_by_file_and_line(tmp_path, reference_path, capsys):
    root = tmp_path / "data"
    _write_folder(root, fresh_seed())
    tok = _tokenizer_dir(tmp_path)
    common = ["--data", str(root), "--tokenizer", tok, "--steps", "3", "--batch-size", "4", "--eval-size", "2",
              "--model", "tiny"]
    report = run(common + ["--out", str(tmp_path / "run")])
    problems = report["bad_data"]
    captions = str(root / "captions.jsonl")
    assert [p.split(": ", 1)[0] for p in problems] == [f"{captions}:{n}" for n in range(N_GOOD + 1, N_GOOD + 5)]
    assert "image 'img/broken.png' unreadable" in problems[0]
    assert "empty caption" in problems[1]
    assert "image 'img/missing.png' not found" in problems[2]
    assert "not a JSON object" in problems[3]
    for v in report["variants"].values():
        assert len(v["losses"]) == 3 and all(np.isfinite(v["losses"]))
        assert v["retrieval"]["n"] == 2
    assert "Left out (4 bad pairs)" in (tmp_path / "run" / "report.md").read_text()
    assert "skipped: " in capsys.readouterr().err

    # refused, with every problem listed, before any training
    assert main(common + ["--bad-data", "error", "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "4 bad pair(s)" in err and all(f"captions.jsonl:{n}:" in err for n in range(N_GOOD + 1, N_GOOD + 5))
    assert not (tmp_path / "refused").exists()

    # too few pairs for the batch: the bad lines that explain it come first, then the refusal
    assert main(common + ["--batch-size", "16", "--out", str(tmp_path / "small")]) == 2
    err = capsys.readouterr().err
    lines = [err.index(f"captions.jsonl:{n}:") for n in range(N_GOOD + 1, N_GOOD + 5)]
    assert "4 bad pair(s) left out" in err and lines == sorted(lines)
    assert max(lines) < err.index("fewer than --batch-size 16")
    assert not (tmp_path / "small").exists()


def test_fusion_data_folder_reads_regions_beside_the_images(tmp_path, reference_path):
    root = tmp_path / "data"
    _write_folder(root, fresh_seed(), fusion=True)
    pairs = FolderPairs(str(root), "fusion", 24)
    reasons = [p.reason for p in pairs.problems]
    assert len(pairs) == N_GOOD and pairs.region_dim == 12 and pairs.num_region_classes == synthetic.NUM_CLASSES
    assert "region file 'img/broken.npz' unusable (expected arrays 'features' and 'boxes'" in reasons[0]
    assert "empty caption" in reasons[1] and "'img/missing.png' not found" in reasons[2]
    example = pairs[0]
    assert example.image is None and example.regions.features.shape[1] == 12
    # no --tokenizer: a word-level tokenizer is built from the training captions
    report = run(["--task", "fusion", "--data", str(root), "--steps", "2",
                  "--batch-size", "4", "--eval-size", "2", "--model", "tiny", "--out", str(tmp_path / "run")])
    assert all(np.isfinite(v["final_loss"]) for v in report["variants"].values())


def test_csv_captions_and_region_width_mismatch(tmp_path):
    root = tmp_path / "data"
    _write_folder(root, fresh_seed(), fusion=True)
    (root / "captions.jsonl").unlink()
    np.savez(root / "img" / "3.npz", features=np.ones((2, 5), np.float32), boxes=np.zeros((2, 4), np.float32))
    (root / "captions.csv").write_text(
        'image,caption\nimg/0.png,"a red circle, and more"\nimg/1.png,\nimg/2.png,a,b\nimg/3.png,three\n'
        'img/4.png,four\n'
    )
    pairs = FolderPairs(str(root), "fusion", 24)
    assert [(p.line, p.reason.split(" ")[0]) for p in pairs.problems] == [(3, "empty"), (4, "expected"), (5, "regions")]
    assert "D=5, K=0, unlike D=12" in pairs.problems[2].reason
    assert [c for _, c in pairs.items] == ["a red circle, and more", "four"]
    with pytest.raises(DataError, match="3 bad pair"):
        FolderPairs(str(root), "fusion", 24, bad_data="error")
    (root / "captions.jsonl").write_text("")
    with pytest.raises(ValueError, match="exactly one of captions.jsonl, captions.csv"):
        FolderPairs(str(root), "clip", 24)


def test_tokenizers(tmp_path):
    tok = word_level_tokenizer(synthetic.vocabulary())
    ids, mask = encode(tok, ["a small red circle", "A LARGE blue zebra " + "square " * 40], context_length=12)
    assert ids.shape == mask.shape == (2, 12)
    assert ids[0, :6].tolist() == [tok.bos_token_id, *tok.convert_tokens_to_ids(["a", "small", "red", "circle"]),
                                   tok.eos_token_id]
    assert mask[0].tolist() == [1] * 6 + [0] * 6 and ids[0, 6:].eq(tok.pad_token_id).all()
    assert ids[1, 4] == tok.unk_token_id and ids[1, -1] == tok.eos_token_id  # truncated, the end token kept
    path = _tokenizer_dir(tmp_path)
    assert torch.equal(encode(load_tokenizer(path), ["a red square"], 8)[0], encode(tok, ["a red square"], 8)[0])
    with pytest.raises(ValueError, match="not a directory"):
        load_tokenizer(str(tmp_path / "nowhere"))
    # a folder with a vocab.txt only (no tokenizer_config.json naming its class): the folder is named,
    # with what it must hold and how to make it
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nred\n")
    with pytest.raises(ValueError, match="could not load a tokenizer from --tokenizer") as err:
        load_tokenizer(str(bare))
    assert str(bare) in str(err.value) and "tokenizer.json" in str(err.value)
    assert "BertTokenizer(vocab='vocab.txt').save_pretrained(DIR)" in str(err.value)
    from transformers import BertTokenizer

    BertTokenizer(vocab=str(bare / "vocab.txt")).save_pretrained(str(bare))  # the recipe the message gives
    ids, _ = encode(load_tokenizer(str(bare)), ["red"], 4)
    assert ids[0, :3].tolist() == [2, 4, 3]

    # built from captions: their words (split as the tokenizer splits), most frequent first
    tok = caption_tokenizer(["A cat, on a mat.", "a dog"], max_words=4)
    assert [tok.convert_ids_to_tokens(i) for i in range(5, 9)] == ["a", "cat", ",", "on"]
    ids, _ = encode(tok, ["a dog on a mat"], 8)
    assert ids[0, :7].tolist() == [tok.bos_token_id, 5, tok.unk_token_id, 8, 5, tok.unk_token_id, tok.eos_token_id]


def test_synthetic_scenes_are_seeded_and_varied():
    seed = fresh_seed()
    data = synthetic.SyntheticPairs(64, seed, "train", "fusion", max_regions=8, region_dim=16)
    again = synthetic.SyntheticPairs(64, seed, "train", "fusion", max_regions=8, region_dim=16)
    heldout = synthetic.SyntheticPairs(64, seed, "heldout", "fusion", max_regions=8, region_dim=16)
    assert data[5].caption == again[5].caption and torch.equal(data[5].regions.features, again[5].regions.features)
    assert [data[i].caption for i in range(64)] != [heldout[i].caption for i in range(64)]
    lengths = {len(data[i].caption.split()) for i in range(64)}
    counts = {data[i].regions.features.shape[0] for i in range(64)}
    assert len(lengths) >= 5 and len(counts) >= 4 and max(counts) <= 8
    probs = data[0].regions.class_probs
    assert probs.shape[1] == synthetic.NUM_CLASSES and torch.allclose(probs.sum(1), torch.ones(len(probs)))
    image = synthetic.SyntheticPairs(4, seed, "train", "clip", image_size=32)[0].image
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and image.float().std() > 10


def test_batch_order_is_a_function_of_the_step_and_ranks_split_the_global_batch():
    order = BatchOrder(50, 8, seed=3)
    epoch0 = [order.indices(s) for s in range(6)]
    assert sorted(sum(epoch0, [])) == sorted(set(sum(epoch0, []))) and len(sum(epoch0, [])) == 48
    assert BatchOrder(50, 8, seed=3).indices(7) == order.indices(7) != order.indices(1)
    parts = [list(range(15))[rank_slice(15, r, 2)] for r in range(2)]
    assert parts == [list(range(8)), list(range(8, 15))]
    with pytest.raises(ValueError, match="fewer than --batch-size 64"):
        BatchOrder(10, 64, seed=0)


def test_a_read_error_mid_run_saves_the_last_completed_step(tmp_path, reference_path, monkeypatch):
    from mmkernels.train import checkpoint, folder

    root = tmp_path / "data"
    _write_folder(root, fresh_seed())
    load, calls = folder._load_image, []

    def failing_load(path, size):
        calls.append(path)
        # the check reads each image of a non-empty caption once (N_GOOD good ones and the broken
        # one); then two steps of batch 4 read 8 more; the next read fails
        if len(calls) > N_GOOD + 1 + 8:
            raise OSError(f"{path}: input/output error")
        return load(path, size)

    monkeypatch.setattr(folder, "_load_image", failing_load)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="input/output error"):
        run(["--data", str(root), "--tokenizer", _tokenizer_dir(tmp_path), "--steps", "5", "--batch-size", "4",
             "--eval-size", "2", "--save-every", "0", "--no-compare", "--out", str(out)])
    state = checkpoint.load(str(out / "mmkernels" / "checkpoint.pt"))
    assert state["step"] == 2 and len(state["losses"]) == 2
