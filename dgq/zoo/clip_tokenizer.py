"""CLIP BPE tokenizer built offline from the vocabulary file vendored in ``data/``.

``bpe_simple_vocab_16e6.txt.gz`` is OpenAI CLIP's BPE merge list (MIT licence), the same file
open_clip ships. From it we rebuild the 49,408-entry vocabulary exactly as CLIP does: the 256 byte
symbols, the same symbols with the end-of-word marker ``</w>``, one entry per merge, then the two
special tokens. The result tokenizes as Stable Diffusion's tokenizer does.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources

from transformers import CLIPTokenizer

# CLIP uses the first 49152 - 256 - 2 merges of the file (its first line is a header).
_N_MERGES = 49152 - 256 - 2
MODEL_MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode mapping (the base alphabet of the BPE)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    path = resources.files("dgq.zoo") / "data" / "bpe_simple_vocab_16e6.txt.gz"
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _N_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def build_clip_tokenizer(model_max_length: int = MODEL_MAX_LENGTH) -> CLIPTokenizer:
    """Return SD's CLIP tokenizer (vocab 49408, BOS 49406, EOS/pad 49407), built without network."""
    vocab, merges = _vocab_and_merges()
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges))
    tok.model_max_length = model_max_length
    return tok
