"""The one place that touches transformers' key/value cache: what it touches, pinned to the releases
checked.

- The keyword a model's forward and `generate` take the cache under: `past_key_values` up to 5.23,
  `cache` from 5.24 (checked in the 5.20.2, 5.22.0, 5.23.0, 5.24.0 and 5.25.0 wheels; 5.24 keeps the old
  name as a deprecated alias, with a warning, until 5.40). Chosen by version, never by reading a signature.
- `DynamicCache(config=...)`, its `update(keys, values, layer)` and `get_seq_length()`, the public API a
  model fills a cache through; `select_rows` also reads `cache.layers[i].keys / .values` (the layout of
  transformers 5: one `DynamicLayer` per decoder layer, tensors [batch, heads, tokens, head_dim]) to build
  a new cache of chosen batch rows without copying the others.
- `generate(inputs_embeds=..., attention_mask=..., position_ids=..., <cache keyword>=...)` continues a
  cache: `inputs_embeds` spans the cached tokens too (only its last part is read), explicit position ids
  are extended by one per new token (the same in 5.20 and 5.25).

`check_transformers()` refuses a release outside `SUPPORTED` before any model is loaded;
`tests/test_kv_cache.py` checks the range and the behaviour on a small Llama.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache, PretrainedConfig

SUPPORTED = (Version("5.20"), Version("6.0"))  # [low, high): the releases whose cache API is described above
_RENAMED_IN = Version("5.24")


def transformers_version() -> Version:
    return Version(transformers.__version__)


def check_transformers(version: Version | None = None) -> None:
    """Raise (naming the range) when transformers is a release this module was not checked against."""
    version = version or transformers_version()
    low, high = SUPPORTED
    if not low <= Version(version.base_version) < high:
        raise RuntimeError(f"transformers {version} is outside the range the answer engine's cache code is "
                           f"checked with (>={low}, <{high}): install one in that range "
                           f"(pip install 'transformers>={low},<{high}')")


def cache_keyword(version: Version | None = None) -> str:
    """The keyword forward and `generate` take a key/value cache under in this transformers release."""
    version = version or transformers_version()
    return "cache" if Version(version.base_version) >= _RENAMED_IN else "past_key_values"


CACHE = cache_keyword()


def new_cache(config: PretrainedConfig) -> DynamicCache:
    """An empty cache for a model of `config` (its text config), filled by the model's forward."""
    return DynamicCache(config=config)


def select_rows(cache: DynamicCache, rows: Sequence[int], config: PretrainedConfig) -> DynamicCache:
    """A new cache holding batch rows `rows` of `cache` (repeats allowed: one video's prefix for several
    questions); `cache` is left as it is."""
    index = torch.as_tensor(list(rows), dtype=torch.long)
    picked = new_cache(config)
    for layer, stored in enumerate(cache.layers):
        where = index.to(stored.keys.device)
        picked.update(stored.keys.index_select(0, where), stored.values.index_select(0, where), layer)
    return picked


def keep_rows(cache: DynamicCache, rows: Sequence[int]) -> None:
    """Keep only batch rows `rows` of `cache`, in place (a finished conversation's rows are dropped)."""
    cache.batch_select_indices(torch.as_tensor(list(rows), dtype=torch.long))
