"""Training text and byte-level tokens.

The default corpus is real English prose that every Python install already has (the
``pydoc`` topic pages, ~0.5 MB), so a first run needs no download. Tokens are raw UTF-8 bytes
(ids 0..255), matching the APT models' byte vocabulary: no tokenizer file to ship or mismatch.
Batches are random windows drawn from a seeded ``torch.Generator``; saving that generator's
state makes a resumed run draw exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from apt_model.errors import VBDataError
from apt_model.i18n import tr

VOCAB_SIZE = 256
VAL_FRACTION = 0.1

# Read from folders; an explicitly named file may have any extension as long as it is text.
TEXT_EXTENSIONS = frozenset({
    ".txt", ".md", ".rst", ".py", ".pyi", ".json", ".jsonl", ".csv", ".tsv", ".yaml", ".yml",
    ".toml", ".ini", ".cfg", ".html", ".htm", ".xml", ".tex", ".js", ".ts", ".c", ".h", ".cc",
    ".cpp", ".hpp", ".java", ".go", ".rs", ".sh", ".log",
})
_SKIP_DIRS = frozenset({"__pycache__", "node_modules"})
_DOC_SEPARATOR = "\n\n"


def default_corpus_text() -> str:
    """The pydoc topic pages joined in sorted key order (deterministic across runs)."""
    from pydoc_data.topics import topics

    return _DOC_SEPARATOR.join(topics[key] for key in sorted(topics))


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as a uint8 tensor (ids 0..255; uint8 keeps the corpus small)."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()


def decode(ids: torch.Tensor | Iterable[int]) -> str:
    """Bytes back to text; a sample cut mid-character shows a replacement mark, not an error."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return bytes(v & 0xFF for v in values).decode("utf-8", errors="replace")


def _read_text_file(path: Path) -> str | None:
    """The file's text, or None when it is binary (a NUL byte or not UTF-8)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise VBDataError(tr(f"无法读取数据文件 {path}: {exc.strerror}",
                             f"cannot read data file {path}: {exc.strerror}")) from None
    if b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _folder_files(folder: Path) -> list[Path]:
    """Text files under ``folder``, recursively, in sorted order; hidden folders skipped."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS)
        found.extend(Path(root, name) for name in sorted(files)
                     if Path(name).suffix.lower() in TEXT_EXTENSIONS)
    return found


def load_text(paths: Sequence[str | os.PathLike]) -> str:
    """Concatenate the text of files and folders (recursively); binaries are skipped."""
    docs: list[str] = []
    for given in paths:
        path = Path(given).expanduser()
        if not path.exists():
            raise VBDataError(tr(f"数据路径不存在: {path}", f"data path does not exist: {path}"))
        if path.is_dir():
            texts = [t for t in map(_read_text_file, _folder_files(path)) if t]
            if not texts:
                raise VBDataError(tr(f"数据文件夹 {path} 中没有文本文件 (支持 {', '.join(sorted(TEXT_EXTENSIONS))})",
                                     f"data folder {path} holds no text files ({', '.join(sorted(TEXT_EXTENSIONS))})"))
            docs.extend(texts)
        else:
            text = _read_text_file(path)
            if text is None:
                raise VBDataError(tr(f"数据文件不是 UTF-8 文本: {path}", f"data file is not UTF-8 text: {path}"))
            if not text:
                raise VBDataError(tr(f"数据文件为空: {path}", f"data file is empty: {path}"))
            docs.append(text)
    return _DOC_SEPARATOR.join(docs)


@dataclass
class ByteCorpus:
    """Train and validation tokens: the last ``VAL_FRACTION`` of the stream is held out."""

    train: torch.Tensor
    val: torch.Tensor
    source: str
    digest: str  # SHA-256 of all tokens (train then val), the first 16 hex digits

    @classmethod
    def from_text(cls, text: str, source: str, val_fraction: float = VAL_FRACTION) -> ByteCorpus:
        tokens = encode(text)
        n_val = int(len(tokens) * val_fraction)
        return cls(train=tokens[: len(tokens) - n_val], val=tokens[len(tokens) - n_val:], source=source,
                   digest=hashlib.sha256(text.encode("utf-8")).hexdigest()[:16])

    @classmethod
    def load(cls, paths: Sequence[str | os.PathLike] | None = None) -> ByteCorpus:
        """The given files/folders, or the embedded pydoc corpus when none are given."""
        if not paths:
            return cls.from_text(default_corpus_text(), source="pydoc_data.topics")
        return cls.from_text(load_text(paths), source=", ".join(map(str, paths)))

    def fingerprint(self) -> str:
        """A short hash of all tokens: a resumed run checks it trains on the same data.

        Taken from the text's bytes when the corpus is built (no tensor-to-bytes round trip:
        that would need numpy, which a plain ``pip install -e .`` does not bring)."""
        return self.digest

    def check_fits(self, seq_len: int) -> None:
        """Both splits must hold at least one (seq_len + 1)-token window."""
        need = seq_len + 1
        if len(self.val) < need or len(self.train) < need:
            raise VBDataError(tr(
                f"数据太少 ({len(self.train) + len(self.val)} 字节, 验证集 {len(self.val)}): 每个划分至少需要 "
                f"{need} 个 token; 请减小 --seq-len 或提供更多数据",
                f"not enough data ({len(self.train) + len(self.val)} bytes, validation {len(self.val)}): each "
                f"split needs at least {need} tokens; lower --seq-len or add data"))

    def steps_per_epoch(self, batch_size: int, seq_len: int) -> int:
        """Steps that see about every training token once."""
        return max(1, len(self.train) // (batch_size * seq_len))

    def get_batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
        """``batch_size`` random windows of ``seq_len + 1`` tokens, int64 (B, T+1).

        The model takes the whole window as input and labels; it shifts internally, so every
        window trains ``seq_len`` next-token predictions.
        """
        tokens = self.train if split == "train" else self.val
        starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=generator)
        return tokens.unfold(0, seq_len + 1, 1)[starts].long()
