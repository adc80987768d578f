"""Compressed weights and KV cache: group-wise int4 and int8 formats (``formats``, ``kv``)."""
