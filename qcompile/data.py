"""Text for calibration and evaluation: a text file, tokenized once, cut into fixed-length token windows.

Protocol (BRIEF.md): the file is read whole, tokenized once without BOS, cut into non-overlapping windows;
a trailing partial window is dropped. Calibration and training use the WikiText-2 *validation* split by default;
evaluation uses the *test* split; never calibrate on test text.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from qcompile.errors import QCompileError

WIKITEXT_FILES = {"valid": "wiki.valid.raw", "test": "wiki.test.raw"}


def _candidate_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("QCOMPILE_DATA_DIR"):
        dirs.append(Path(os.environ["QCOMPILE_DATA_DIR"]))
    repo = Path(__file__).resolve().parent.parent
    for base in (Path.cwd(), repo):
        dirs += [base / "shared/data/wikitext-2-raw", base.parent / "shared/data/wikitext-2-raw"]
    return dirs


def wikitext_path(split: str) -> Path:
    """Locate WikiText-2 raw ``split`` ('valid' or 'test'): $QCOMPILE_DATA_DIR, then ``shared/`` beside or
    inside the working directory or the source checkout."""
    name = WIKITEXT_FILES[split]
    for d in _candidate_dirs():
        if (d / name).is_file():
            return d / name
    raise QCompileError(
        f"cannot find WikiText-2 {split} text ({name}); pass a text file explicitly or set QCOMPILE_DATA_DIR"
    )


def resolve_text(path: str | os.PathLike | None, default_split: str) -> Path:
    if path is None:
        return wikitext_path(default_split)
    p = Path(path).expanduser()
    if not p.is_file():
        raise QCompileError(f"text file {p} does not exist")
    return p


def precheck_text(path: Path, seq_len: int) -> None:
    """What can be known of a text's fitness for ``seq_len``-token windows without a tokenizer: it is UTF-8, and
    it has at least ``seq_len - 1`` bytes (every token of a byte-level or SentencePiece vocabulary covers at least
    one byte, but for SentencePiece's one dummy-prefix piece, so fewer bytes cannot fill one window). Lets
    ``export --eval`` refuse before minutes of export; the tokenizer has the last word."""
    _read_text(path)
    size = Path(path).stat().st_size
    if size + 1 < seq_len:
        raise QCompileError(f"the text {path} has {size} bytes, too few for one window of {seq_len} tokens")


def _read_text(path: str | os.PathLike) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise QCompileError(f"{path} is not UTF-8 text") from None


@lru_cache(maxsize=8)
def _tokenize_file(path: str, tokenizer) -> torch.Tensor:
    ids = tokenizer(_read_text(path), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_stream(path: Path, tokenizer) -> torch.Tensor:
    """All tokens of ``path`` (no BOS), tokenized once per (file, tokenizer) and cached in memory."""
    return _tokenize_file(str(path), tokenizer)


def system_prompt_ids(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` as the tokenizer's chat template writes a system turn (the raw text when the tokenizer
    has no template): the prefix that BiSup's prompt mixed precision keeps float and that ``qcompile eval
    --system-prompt`` reads every window after."""
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "system", "content": text}], tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # transformers 5 returns a BatchEncoding
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(list(ids), dtype=torch.long)


def windows(tokens: torch.Tensor, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping ``[n, seq_len]`` windows in file order; the trailing partial window is dropped."""
    n = tokens.numel() // seq_len
    if n == 0:
        raise QCompileError(f"the text has {tokens.numel()} tokens, fewer than one window of {seq_len}")
    if limit is not None:
        n = min(n, limit)
    return tokens[: n * seq_len].view(n, seq_len)


@dataclass
class CalibrationConfig:
    """Where calibration windows come from; shared by every pass that needs data."""

    calib_text: str | None = None  # None = WikiText-2 validation split
    calib_samples: int = 128
    calib_seq_len: int = 2048
    calib_seed: int = 0

    def load(self, tokenizer) -> torch.Tensor:
        """``[calib_samples, calib_seq_len]`` windows drawn at random offsets (seeded) from the text."""
        if self.calib_samples < 1 or self.calib_seq_len < 2:
            raise QCompileError("calib_samples must be >= 1 and calib_seq_len >= 2")
        toks = token_stream(resolve_text(self.calib_text, "valid"), tokenizer)
        if toks.numel() <= self.calib_seq_len:
            raise QCompileError(
                f"calibration text has {toks.numel()} tokens, fewer than calib_seq_len={self.calib_seq_len}"
            )
        g = torch.Generator().manual_seed(self.calib_seed)
        starts = torch.randint(0, toks.numel() - self.calib_seq_len, (self.calib_samples,), generator=g)
        return torch.stack([toks[s : s + self.calib_seq_len] for s in starts.tolist()])
