"""fastkd.cache: a compact on-disk cache of sparse teachers (format: docs/cache-format.md).

CacheWriter writes one (resumably), TeacherCache reads it with random access by token offset,
TeacherCacheDataset serves it to a DataLoader, and `python -m fastkd cache` fills one from a teacher.
"""
from ._store import CacheError
from .reader import TeacherCache, TeacherCacheDataset
from .writer import CacheWriter

__all__ = ["CacheWriter", "TeacherCache", "TeacherCacheDataset", "CacheError"]
