"""Semantic conditional prompts: per-image MLLM answers, extracted offline and cached on disk.

``SemanticCache`` reads a cache, ``write_cache`` / ``CacheWriter`` + ``merge_cache`` write one, and
``python -m mugcp.extract`` fills one from a dataset with any Hugging Face image-text-to-text model.
"""
from mugcp.semantics.cache import SemanticCache
from mugcp.semantics.cache_manifest import CacheError, CacheMismatchError, MissingKeyError, read_manifest
from mugcp.semantics.cache_writer import CacheWriter, merge_cache, write_cache

__all__ = [
    "CacheError",
    "CacheMismatchError",
    "CacheWriter",
    "MissingKeyError",
    "SemanticCache",
    "merge_cache",
    "read_manifest",
    "write_cache",
]
