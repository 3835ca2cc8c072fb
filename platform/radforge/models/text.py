"""CLIP text towers: (a) a small transformer over a BPE tokenizer trained on the corpus' reports,
(b) any Hugging Face encoder + tokenizer loaded offline from a directory or object-store URL.

Both towers take `list[str]` and return mean-pooled features [B, width]: the tower owns its
tokenizer, so callers (CLIP, evaluation, serving) never handle token ids. Reports are redacted
text; nothing here logs them.

(a) `train_tokenizer` uses the `tokenizers` library (Rust BPE trainer): lowercase + accent strip,
whitespace/punctuation pre-tokenisation, `[CLS] … [SEP]` template, truncation to `max_len`,
padding to the longest text of the batch (not to max_len: short reports cost less).
A domain tokenizer of ~2k merges is enough for report language and keeps the embedding table
small; a general-purpose vocabulary would mostly be unused.

(b) `load_hf` calls `AutoModel` / `AutoTokenizer` with `local_files_only=True`: clusters often
have no hub access, and a silent download of different weights would be worse than an error.
Object-store paths (s3://…) are copied to a temporary directory with fsspec first.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import fsspec
import torch
from torch import nn

from radforge.config import TextConfig
from radforge.models.vit import Transformer, init_weights

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
_TOKENIZER_FILE = "tokenizer.json"
_META_FILE = "radforge_tokenizer.json"


class Tokenizer:
    """A trained `tokenizers.Tokenizer` plus radforge's padding/truncation policy."""

    def __init__(self, tokenizer, max_len: int):
        self.max_len = int(max_len)
        self.pad_id = tokenizer.token_to_id("[PAD]")
        tokenizer.enable_truncation(self.max_len)
        tokenizer.enable_padding(pad_id=self.pad_id, pad_token="[PAD]")
        self._tok = tokenizer

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (input_ids LongTensor[B, L], attention_mask LongTensor[B, L], 1 = real token)."""
        if isinstance(texts, str):
            raise TypeError("Tokenizer takes a list of strings")
        enc = self._tok.encode_batch([t or "" for t in texts])
        ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
        return ids, mask

    def save(self, directory: str) -> None:
        """Write tokenizer.json + radforge_tokenizer.json into `directory` (any fsspec URL)."""
        fs, root = fsspec.core.url_to_fs(directory)
        fs.makedirs(root, exist_ok=True)
        with fs.open(f"{root.rstrip('/')}/{_TOKENIZER_FILE}", "w") as f:
            f.write(self._tok.to_str())
        with fs.open(f"{root.rstrip('/')}/{_META_FILE}", "w") as f:
            json.dump({"kind": "small", "max_len": self.max_len}, f)

    @classmethod
    def load(cls, directory: str) -> "Tokenizer":
        from tokenizers import Tokenizer as _Tok

        fs, root = fsspec.core.url_to_fs(directory)
        with fs.open(f"{root.rstrip('/')}/{_TOKENIZER_FILE}", "r") as f:
            tok = _Tok.from_str(f.read())
        with fs.open(f"{root.rstrip('/')}/{_META_FILE}", "r") as f:
            meta = json.load(f)
        return cls(tok, meta["max_len"])


def train_tokenizer(texts: Iterable[str], cfg: TextConfig) -> Tokenizer:
    """Train a BPE tokenizer of at most `cfg.vocab_size` tokens on `texts` (e.g. the training
    split's reports). Deterministic for the same texts in the same order."""
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = _Tok(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, special_tokens=list(SPECIALS), show_progress=False)
    tok.train_from_iterator((t for t in texts if t), trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return Tokenizer(tok, cfg.max_len)


def sample_sentences(text: str, rng) -> str:
    """Training augmentation for report text (as in CXR-CLIP): a random non-empty subset of the
    report's sentences, in random order. Each subset is still true of the image, and short
    texts teach the tower to bind a finding to its polarity ("no effusion" vs "effusion is
    present") instead of counting polarity words, which is what zero-shot prompts need.
    `rng`: a numpy Generator. Sentences are split on '.', so abbreviations split too (harmless)."""
    parts = [p.strip() + "." for p in text.split(".") if p.strip()]
    if len(parts) <= 1:
        return text
    k = int(rng.integers(1, len(parts) + 1))
    return " ".join(parts[i] for i in rng.permutation(len(parts))[:k])


_HEADER = re.compile(r"^[ \t]*([A-Za-z][A-Za-z /]{0,40}):", re.M)


def report_sections(text: str, sections: Sequence[str]) -> str:
    """The named sections of a report ("FINDINGS: …" up to the next "HEADER:" line), joined in
    `sections` order; the whole text when `sections` is empty or the report has none of them.
    Real reports open with examination, history and technique lines that fill a short token
    budget before the findings; reading the findings and impression keeps what the image shows."""
    if not sections or not text:
        return text
    heads = list(_HEADER.finditer(text))
    found: dict[str, str] = {}
    for i, m in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        found.setdefault(m.group(1).strip().lower(), " ".join(text[m.end():end].split()))
    parts = [found[name] for name in sections if found.get(name)]
    return " ".join(parts) if parts else text


@dataclass(frozen=True)
class ReportView:
    """What training feeds the text tower for a report (the loader's `text_view`): its sections
    (`model.text.sections`) and, with a generator, a random subset of their sentences
    (`model.text.sample_sentences`). Evaluation and serving read sections only: the towers apply
    `report_sections` themselves, so the same words reach the model everywhere."""

    sections: tuple[str, ...] = ()
    sample: bool = False

    @classmethod
    def from_config(cls, cfg: TextConfig) -> "ReportView":
        return cls(tuple(cfg.sections), bool(cfg.sample_sentences))

    def __call__(self, text: str, rng=None) -> str:
        text = report_sections(text, self.sections)
        return sample_sentences(text, rng) if self.sample and rng is not None else text


def token_lengths(tokenizer: Tokenizer, texts: Iterable[str]) -> list[int]:
    """Untruncated token counts ([CLS] and [SEP] included) of `texts` under `tokenizer`."""
    from tokenizers import Tokenizer as _Tok

    raw = _Tok.from_str(tokenizer._tok.to_str())
    raw.no_truncation()
    raw.no_padding()
    return [len(e.ids) for e in raw.encode_batch([t or "" for t in texts])]


def truncation_warning(lengths: Sequence[int], max_len: int) -> str | None:
    """One line stating how many reports exceed `max_len` tokens (and lose their tail), or None."""
    over = [n for n in lengths if n > max_len]
    if not over:
        return None
    return (f"model.text.max_len={max_len}: {len(over)} of {len(lengths)} training reports "
            f"({100 * len(over) / len(lengths):.0f}%) are longer (median {sorted(lengths)[len(lengths) // 2]}, "
            f"longest {max(over)} tokens) and are truncated; raise model.text.max_len or read only "
            f"model.text.sections (e.g. [findings, impression])")


def _mean_pool(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)[..., None]
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


class SmallTextEncoder(nn.Module):
    """Token + learned position embeddings -> pre-norm transformer (padding masked) -> mean pool."""

    def __init__(self, tokenizer: Tokenizer, cfg: TextConfig):
        super().__init__()
        self.tokenizer = tokenizer
        self.width = cfg.width
        self.sections = tuple(cfg.sections)
        self.tok_embed = nn.Embedding(tokenizer.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, tokenizer.max_len, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.depth, cfg.heads)
        init_weights(self)
        nn.init.normal_(self.tok_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)

    def forward(self, texts: list[str]) -> torch.Tensor:
        ids, mask = self.tokenizer([report_sections(t, self.sections) for t in texts])
        device = self.tok_embed.weight.device
        ids, mask = ids.to(device), mask.to(device)
        x = self.tok_embed(ids) + self.pos_embed[:, : ids.shape[1]]
        x = self.transformer(x, mask.bool())
        return _mean_pool(x, mask)

    def save_tokenizer(self, directory: str) -> None:
        self.tokenizer.save(directory)


class HFTextEncoder(nn.Module):
    """A Hugging Face encoder (BERT-like) with its tokenizer; mean-pooled last hidden state."""

    def __init__(self, model: nn.Module, tokenizer, max_len: int, sections: Sequence[str] = ()):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.sections = tuple(sections)
        self.width = int(model.config.hidden_size)

    def forward(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer([report_sections(t or "", self.sections) for t in texts], padding=True, truncation=True,
                             max_length=self.max_len, return_tensors="pt")
        device = next(self.model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        out = self.model(**enc).last_hidden_state
        return _mean_pool(out, enc["attention_mask"])

    def save_tokenizer(self, directory: str) -> None:
        """Tokenizer + model config (no weights): with the exported weights, enough to rebuild
        the tower via `load_hf(directory, weights=False)`."""
        fs, root = fsspec.core.url_to_fs(directory)
        with tempfile.TemporaryDirectory() as tmp:
            self.tokenizer.save_pretrained(tmp)
            self.model.config.save_pretrained(tmp)
            fs.makedirs(root, exist_ok=True)
            for name in os.listdir(tmp):
                fs.put_file(os.path.join(tmp, name), f"{root.rstrip('/')}/{name}")


def _import_transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is a dependency; kept for slim installs
        raise ImportError("model.text.kind 'hf' needs the `transformers` package: pip install transformers") from e
    return transformers


def load_hf(path: str, *, weights: bool = True) -> tuple[nn.Module, object]:
    """(AutoModel, AutoTokenizer) from a local directory or any fsspec URL, offline.

    `weights=False` builds the model from its config only (random init), for callers that load
    exported weights next (radforge.checkpoint)."""
    transformers = _import_transformers()

    def _load(local: str):
        tok = transformers.AutoTokenizer.from_pretrained(local, local_files_only=True)
        if weights:
            model = transformers.AutoModel.from_pretrained(local, local_files_only=True)
        else:
            config = transformers.AutoConfig.from_pretrained(local, local_files_only=True)
            model = transformers.AutoModel.from_config(config)
        return model, tok

    fs, root = fsspec.core.url_to_fs(path)
    if not fs.isdir(root):
        raise FileNotFoundError(f"Hugging Face model directory not found: {path}")
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return _load(root)
    with tempfile.TemporaryDirectory() as tmp:  # both objects are in memory once loaded
        for src in fs.find(root):
            rel = src[len(root.rstrip("/")) + 1:]
            dest = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            fs.get_file(src, dest)
        return _load(tmp)


def build_text_encoder(cfg: TextConfig, tokenizer: Tokenizer | None = None, *, pretrained: bool = True) -> nn.Module:
    """The text tower for `cfg.kind`: small needs the trained `tokenizer`; hf loads `cfg.path`."""
    if cfg.kind == "small":
        if tokenizer is None:
            raise ValueError("model.text.kind 'small' needs a tokenizer (radforge.models.text.train_tokenizer "
                             "on the training reports, or Tokenizer.load from an exported model)")
        return SmallTextEncoder(tokenizer, cfg)
    model, tok = load_hf(cfg.path, weights=pretrained)
    return HFTextEncoder(model, tok, cfg.max_len, cfg.sections)
