"""The retrieval index (`radforge index`; `radforge.serve`'s /v1/retrieve): its one owner.

An index directory (any fsspec URL) holds

    embeddings.npy   float32 [N, D], L2-normalised image embeddings (the model's `embed_image`)
    index.json       {"format": "radforge-index/1", "model_id", "profile_id", "image", "split",
                      "n", "dim", "keys": [N pseudonymous sample keys]}; written last, so its
                      presence marks a complete index

Nothing else spells these names: `build` writes an index, `info` reads its description (small:
serve's catalog), `load` its embeddings and keys. The index holds only pseudonymous sample keys
and numbers, never report text or identifying values.
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass, field

_JSON = "index.json"
_EMBEDDINGS = "embeddings.npy"
FORMAT = "radforge-index/1"


@dataclass(frozen=True)
class IndexInfo:
    """What index.json says about an index (`keys` only when read with them)."""

    model_id: str
    profile_id: str
    image: str  # kinds.ImageKind name
    split: str
    n: int
    dim: int
    out: str = ""  # the index directory
    keys: list[str] = field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        return {"format": FORMAT, "model_id": self.model_id, "profile_id": self.profile_id,
                "image": self.image, "split": self.split, "n": self.n, "dim": self.dim, "keys": list(self.keys)}


def info(url: str) -> IndexInfo:
    """The description of the index at `url` (ValueError when it is not a radforge index)."""
    from radforge import storage

    doc = json.loads(storage.read_bytes(storage.join(url, _JSON)))
    if doc.get("format") != FORMAT:
        raise ValueError(f"{url}: not a {FORMAT} index")
    return IndexInfo(model_id=doc["model_id"], profile_id=doc["profile_id"], image=doc["image"], split=doc["split"],
                     n=int(doc["n"]), dim=int(doc["dim"]), out=url, keys=list(doc["keys"]))


def load(url: str):
    """(L2-normalised float32 [N, D] embeddings, keys) of an index dir."""
    import numpy as np

    from radforge import storage

    meta = info(url)
    emb = np.load(io.BytesIO(storage.read_bytes(storage.join(url, _EMBEDDINGS))), allow_pickle=False)
    if emb.shape[0] != len(meta.keys):
        raise ValueError(f"{url}: embeddings and keys disagree")
    return emb.astype(np.float32, copy=False), meta.keys


def _embed_split(lm, shards: str, split: str, batch_size: int, progress: bool):
    """(embeddings float32 [N, D], keys) of a split's samples of the model's image kind."""
    import numpy as np
    import torch

    from radforge import config, loader

    data = config.DataConfig(shards=shards, image=lm.image.name, num_workers=0)
    it = loader.build_loader(data, lm.view, split=split, batch_size=batch_size, train=False)
    embs, keys = [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(unit="sample", desc="index")
    with torch.no_grad():
        for batch in it:
            embs.append(lm.embed_images(batch["image"]).cpu().numpy().astype(np.float32))
            keys += list(batch["key"])
            if bar is not None:
                bar.update(len(batch["key"]))
    if bar is not None:
        bar.close()
    return (np.concatenate(embs) if embs else np.zeros((0, 0), np.float32)), keys


def build(model_url: str, shards: str, out: str, *, split: str = "test", batch_size: int = 16,
          progress: bool = False) -> IndexInfo:
    """Embeddings of a split's samples (the model's image kind) → an index at `out`.

    Samples come through `radforge.loader` in evaluation mode (one pass, centre crops): exactly
    the tensors evaluation sees. The shards must carry the model's preprocessing profile (else
    ConfigError, before any work): embeddings of arrays made another way would not be comparable
    with served requests. Returns the index's description (without its keys).
    """
    import numpy as np

    from radforge import checkpoint, shardspec, storage
    from radforge.errors import ConfigError

    lm = checkpoint.load_for_inference(model_url)
    shard_profile = shardspec.read_manifest(shards)["profile"].get("profile_id")
    if shard_profile != lm.profile.profile_id:
        raise ConfigError(f"{shards} was made with preprocessing profile {shard_profile}, the model with "
                          f"{lm.profile.profile_id}: index shards made with the model's profile")
    matrix, keys = _embed_split(lm, shards, split, batch_size, progress)
    if not keys:
        raise ConfigError(f"split {split!r} of {shards} has no {lm.image.name} samples")
    meta = IndexInfo(model_id=lm.model_id, profile_id=lm.profile.profile_id, image=lm.image.name, split=split,
                     n=len(keys), dim=int(matrix.shape[1]), out=out, keys=keys)
    buf = io.BytesIO()
    np.save(buf, matrix, allow_pickle=False)
    storage.makedirs(out)
    storage.write_bytes_atomic(storage.join(out, _EMBEDDINGS), buf.getvalue())
    storage.write_bytes_atomic(storage.join(out, _JSON), json.dumps(meta.to_json()).encode())  # last: marks completion
    return dataclasses.replace(meta, keys=[])
