"""A word-level `CLIPTokenizer` over the miniature vocabulary.

`CLIPTokenizer` is a byte-pair encoder, so a word-level vocabulary is written as a vocab.json of
single characters plus whole words and a merges.txt that builds each word left to right. The
tokenizer is loaded with `CLIPTokenizer.from_pretrained(folder)` (the fast backend cannot be built
from Python lists), and `build_tokenizer` checks that every vocabulary word is exactly one token.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 16


def write_tokenizer_files(words: list[str], folder: Path, max_length: int = MAX_LENGTH) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tokens: list[str] = []
    for ch in string.ascii_lowercase:
        tokens += [ch, ch + "</w>"]
    ranks: dict[tuple[str, str], int] = {}
    for word in words:  # simulate BPE; where a word gets stuck, append the merge it needs (lowest rank)
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = [(ranks.get((a, b), len(ranks) + 1), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
            rank, i = min(pairs)
            if rank > len(ranks):  # no known merge applies: add one for the first pair
                i = 0
                ranks[(symbols[0], symbols[1])] = len(ranks)
            merged = symbols[i] + symbols[i + 1]
            symbols[i:i + 2] = [merged]
            if merged not in tokens:
                tokens.append(merged)
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    tokens += [BOS, EOS]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {"model_max_length": max_length, "bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
              "unk_token": EOS, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}, indent=1))


def build_tokenizer(words: list[str], folder: Path, max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """Write and load the tokenizer; raise if any word is not a single token."""
    write_tokenizer_files(words, folder, max_length)
    tok = CLIPTokenizer.from_pretrained(str(folder))
    split = [w for w in words if len(tok(w, add_special_tokens=False).input_ids) != 1]
    if split:
        raise RuntimeError(f"miniature tokenizer splits these words: {split}")
    return tok
