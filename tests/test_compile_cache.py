"""The on-disk cache of compiled kernels (engine/compile_cache.py): one key per what the compiled code depends on,
and a cache that cannot be used only means compiling again."""

import dataclasses
import logging

from engine_helpers import tiny_model
from qwenlm.engine import EngineConfig, compile_cache


def test_key_follows_shapes_dtypes_and_engine_config_not_weights():
    a, b = tiny_model(), tiny_model()
    with __import__("torch").no_grad():
        next(b.parameters()).add_(1.0)  # other weight values: the same compiled code
    cfg = EngineConfig()
    key = compile_cache.cache_key(a, cfg)
    assert compile_cache.cache_key(b, cfg) == key
    assert compile_cache.cache_key(a, dataclasses.replace(cfg, max_num_seqs=8)) != key
    assert compile_cache.cache_key(a, dataclasses.replace(cfg, kv_cache_dtype="int8")) != key
    assert compile_cache.cache_key(tiny_model(num_hidden_layers=3), cfg) != key
    assert compile_cache.cache_key(tiny_model().half(), cfg) != key


def test_a_missing_or_broken_cache_means_compiling_again(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="qwenlm.engine"):
        assert compile_cache.load("k", tmp_path) is False
        (tmp_path / "k.bin").write_bytes(b"not a cache")
        assert compile_cache.load("k", tmp_path) is False
    assert "compiling them again" in caplog.text and str(tmp_path / "k.bin") in caplog.text
