"""Tokenizers: a word-level tokenizer built in code from the training captions, or a local one.

Both are Hugging Face fast tokenizers, so the rest of the loop sees one interface:

    tok = word_level_tokenizer(synthetic.vocabulary())       # '[BOS] words [EOS]', [PAD] = 0
    tok = caption_tokenizer(captions)                         # the same, over the captions' words
    tok = load_tokenizer("path/to/tokenizer_dir")             # AutoTokenizer, local files only
    ids, mask = encode(tok, captions, context_length=32)      # (N, L) int64 each, padded to L
"""
from __future__ import annotations

import os

import torch

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]", "[MASK]")
MAX_CAPTION_WORDS = 32768
TOKENIZER_FOLDER = (
    "a Hugging Face tokenizer as save_pretrained writes it: tokenizer.json (a fast tokenizer) with its "
    "tokenizer_config.json, or the vocabulary files of the tokenizer class its tokenizer_config.json names "
    "(e.g. vocab.txt for BertTokenizer), with a padding token and an eos or sep token. To make one offline "
    "from a vocab.txt: BertTokenizer(vocab='vocab.txt').save_pretrained(DIR); or leave --tokenizer "
    "out to build a word-level tokenizer from the training captions"
)


def word_level_tokenizer(words: list[str]):
    """A lower-casing, whitespace-splitting word tokenizer over `words` that writes
    '[BOS] w1 ... wn [EOS]'; unknown words become [UNK]. Returns a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word.lower(), len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
        eos_token="[EOS]", mask_token="[MASK]",
    )


def caption_tokenizer(captions, max_words: int = MAX_CAPTION_WORDS):
    """word_level_tokenizer over the words of `captions` (lower-cased, split as the tokenizer splits
    them): the `max_words` most frequent, ties in order of first appearance."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Whitespace()
    counts: dict[str, int] = {}
    for caption in captions:
        for word, _ in split.pre_tokenize_str(caption.lower()):
            counts[word] = counts.get(word, 0) + 1
    words = sorted(counts, key=lambda w: -counts[w])[:max_words]  # a stable sort keeps first appearance
    return word_level_tokenizer(words)


def load_tokenizer(directory: str):
    """The tokenizer saved in `directory` (tokenizer.json / vocab files), never downloaded."""
    from transformers import AutoTokenizer

    if not os.path.isdir(directory):
        raise ValueError(f"expected --tokenizer to be a local tokenizer directory, got {directory!r} (not a "
                         f"directory); it must hold {TOKENIZER_FOLDER}")
    try:
        tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as err:  # transformers raises OSError, ValueError, ImportError, ... for an unusable folder
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"could not load a tokenizer from --tokenizer {directory!r} ({type(err).__name__}: "
                         f"{reason}); the folder must hold {TOKENIZER_FOLDER}") from err
    if tok.pad_token_id is None:
        raise ValueError(f"the tokenizer in {directory!r} has no padding token; set pad_token in its tokenizer_config.json")
    if end_token_id(tok) is None:
        raise ValueError(
            f"the tokenizer in {directory!r} has neither an eos nor a sep token: the text towers pool "
            "the sequence at that token"
        )
    return tok


def end_token_id(tok):
    """The id of the token that ends every sequence (eos, else sep), or None."""
    return tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id


def encode(tok, captions: list[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (N, context_length) int64: right-padded, truncated with the
    end token kept. A fixed length, as CLIP pads to its context, so every batch has one shape."""
    out = tok(list(captions), padding="max_length", truncation=True, max_length=context_length,
              return_tensors="pt")
    ids, mask = out["input_ids"].long(), out["attention_mask"].long()
    end = end_token_id(tok)
    if captions and not bool((ids == end).any(1).all()):
        raise ValueError(
            f"the tokenizer did not end every caption with its end token (id {end}); the text towers "
            "pool the sequence there: use a tokenizer whose post-processor adds it"
        )
    return ids, mask
