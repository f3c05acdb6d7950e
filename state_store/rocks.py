"""Opening the RocksDB database behind a store, with its column families and tuning."""

from __future__ import annotations

from pathlib import Path

from rocksdict import (
    AccessType,
    BlockBasedOptions,
    Cache,
    DBCompressionType,
    Options,
    Rdict,
)

from state_store.keys import META_CF, OFFSETS_CF, USERS_CF


def _family_options(cache: Cache | None) -> Options:
    opt = Options(raw_mode=True)
    if cache is not None:
        table = BlockBasedOptions()
        table.set_block_cache(cache)
        table.set_bloom_filter(10, False)  # most reads are point lookups, many of absent users
        opt.set_block_based_table_factory(table)
        opt.set_memtable_whole_key_filtering(True)
        opt.set_memtable_prefix_bloom_ratio(0.05)
    opt.set_compression_type(DBCompressionType.lz4())
    opt.set_bottommost_compression_type(DBCompressionType.zstd())
    return opt


def open_rocksdb(path: Path, *, create: bool, read_only: bool, cache_bytes: int) -> Rdict:
    """Open (or with ``create`` create) the database at ``path`` in raw-bytes mode.

    ``read_only`` opens a static view that tolerates a concurrent writer (the write-ahead log
    it finds is replayed into memory, not an error). ``cache_bytes`` sizes the block cache of
    the ``users`` family.
    """
    opt = Options(raw_mode=True)
    opt.create_if_missing(create)
    opt.create_missing_column_families(create)
    families = {
        USERS_CF: _family_options(Cache(cache_bytes)),
        OFFSETS_CF: _family_options(None),
        META_CF: _family_options(None),
    }
    access = AccessType.read_only(False) if read_only else AccessType.read_write()
    return Rdict(str(path), opt, column_families=families, access_type=access)
