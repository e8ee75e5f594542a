"""The transformers adapter: the pinned release range and cache keyword, and a cache built from chosen rows
continuing a small Llama exactly as reading the whole sequence does."""

from __future__ import annotations

import pytest
import torch
from packaging.version import Version
from transformers import LlamaConfig, LlamaModel

from stages import kv_cache


def test_the_installed_transformers_is_in_the_checked_range():
    kv_cache.check_transformers()  # the installed release: no error
    for outside in ("5.19.0", "6.0.0", "4.57.1"):
        with pytest.raises(RuntimeError, match=rf"transformers {outside} is outside the range .*>=5.20, <6"):
            kv_cache.check_transformers(Version(outside))
    kv_cache.check_transformers(Version("5.24.0.dev0"))
    assert [kv_cache.cache_keyword(Version(v)) for v in ("5.20.2", "5.23.0", "5.24.0", "5.25.0")] == [
        "past_key_values", "past_key_values", "cache", "cache"]


def test_selected_rows_continue_as_the_whole_sequence(recwarn):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=16)
    model = LlamaModel(config).eval()
    heads = torch.randn(2, 5, 32)  # two prefixes, read together
    tails = torch.randn(3, 4, 32)  # three continuations: of prefix 1, 0, 1
    with torch.inference_mode():
        cache = kv_cache.new_cache(config)
        model(inputs_embeds=heads, use_cache=True, **{kv_cache.CACHE: cache})
        assert cache.get_seq_length() == 5
        picked = kv_cache.select_rows(cache, [1, 0, 1], config)
        assert picked.get_seq_length() == 5 and cache.get_seq_length() == 5
        continued = model(inputs_embeds=tails, position_ids=torch.arange(5, 9).expand(3, -1), use_cache=True,
                          **{kv_cache.CACHE: picked}).last_hidden_state
        whole = model(inputs_embeds=torch.cat([heads[[1, 0, 1]], tails], 1)).last_hidden_state[:, 5:]
        torch.testing.assert_close(continued, whole, atol=1e-5, rtol=1e-5)
        assert picked.get_seq_length() == 9 and cache.get_seq_length() == 5  # the source is untouched
        kv_cache.keep_rows(picked, [2])
        again = model(inputs_embeds=tails[2:, :1], position_ids=torch.tensor([[9]]), use_cache=True,
                      **{kv_cache.CACHE: picked}).last_hidden_state
        expected = model(inputs_embeds=torch.cat([heads[[1]], tails[2:], tails[2:, :1]], 1)).last_hidden_state
        torch.testing.assert_close(again[0, -1], expected[0, -1], atol=1e-5, rtol=1e-5)
    assert not [w for w in recwarn if "deprecat" in str(w.message).lower()]  # the keyword is current
