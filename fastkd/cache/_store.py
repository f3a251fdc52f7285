"""Files of a cache directory: the JSON manifest and the safetensors shards (docs/cache-format.md).

Every file is written atomically (to `<name>.tmp`, fsync, rename, fsync the directory), so a
killed writer leaves either the old file or the new one, never half of one. A shard is read into
memory whole (never memory-mapped: a file truncated or rewritten under a mapping kills the reader
with SIGBUS), checked against the sha256 the manifest records and its safetensors header against
the layout the manifest implies, before any of its bytes are used. Nothing is unpickled.
"""
import hashlib
import json
import os
import stat
import struct

import torch

from . import _codec, _format

MANIFEST = "manifest.json"
FORMAT = "fastkd-teacher-cache"
FORMAT_VERSION = 2  # what a new cache is written as (2: sampled rows ragged)
READS = (1, 2)  # the versions this fastkd reads (and resumes)
_DTYPES = {"U8": torch.uint8, "F32": torch.float32}


class CacheError(ValueError):
    """A cache directory that is missing, corrupt, or does not match what the caller asked for."""


def write_atomic(path: str, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves the old file or the new one, not a mix."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _manifest_digest(manifest: dict) -> str:
    body = {key: value for key, value in manifest.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(directory: str, manifest: dict) -> None:
    manifest = dict(manifest, checksum=_manifest_digest(manifest))
    write_atomic(os.path.join(directory, MANIFEST), (json.dumps(manifest, indent=1) + "\n").encode())


def read_manifest(directory: str) -> dict:
    """The manifest of the cache in `directory`, checked for format, version, its checksum and,
    field by field, as if hostile (_format.check_manifest)."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise CacheError(f"{directory!r} is not a fastkd teacher cache: {MANIFEST} not found")
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read(1 << 26))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CacheError(f"{path}: corrupt manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("format_version") not in READS:
        raise CacheError(f"{path}: format version {manifest.get('format_version')!r}; this fastkd "
                         f"reads versions {', '.join(map(str, READS))}")
    if manifest.get("checksum") != _manifest_digest(manifest):
        raise CacheError(f"{path}: checksum mismatch (the manifest was modified or corrupted)")
    _format.check_manifest(manifest, lambda field, why: CacheError(f"{path}: field {field!r} {why}"))
    return manifest


def shard_bytes(tensors: dict, metadata: dict) -> bytes:
    """One shard file's bytes in the safetensors layout (an 8-byte little-endian header length,
    a JSON header padded with spaces to a multiple of 8, then the tensors' bytes), written here
    with sorted keys so that the same rows always give the same bytes (and sha256)."""
    names = sorted(tensors)
    header, offset = {"__metadata__": {k: str(v) for k, v in sorted(metadata.items())}}, 0
    codes = {v: k for k, v in _DTYPES.items()}
    for name in names:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return b"".join([struct.pack("<Q", len(text)), text] +
                    [tensors[n].numpy().tobytes() for n in names])  # C order, whatever the strides


def write_shard(directory: str, name: str, data: bytes) -> dict:
    """Write one shard atomically -> its manifest entry (without num_tokens)."""
    write_atomic(os.path.join(directory, name), data)
    return {"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def shard_path(directory: str, name: str) -> str:
    """The path of shard `name`: a plain file name inside `directory` (no separator, no '..', no
    link leaving the directory), else CacheError."""
    if not isinstance(name, str) or not _format.SHARD_NAME.fullmatch(name):  # no separator, no '..'
        raise CacheError(f"{directory!r}: shard name {name!r} is not a plain shard file name")
    path = os.path.join(directory, name)
    root = os.path.realpath(directory)
    if os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise CacheError(f"{path}: a link that leaves the cache directory")
    return path


def read_shard(directory: str, entry: dict, meta: dict, verify: bool = True) -> dict:
    """Read one shard into memory -> {name: tensor} owning its bytes. Checks: a regular file (a
    FIFO would block forever), its size and sha256 against `entry`, and its safetensors header
    against the layout `meta` implies for entry["num_tokens"] tokens -- dtypes, shapes, and
    offsets that tile the data exactly."""
    path = shard_path(directory, entry["file"])
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CacheError(f"{path}: shard listed in the manifest is missing") from None
    except OSError as e:
        raise CacheError(f"{path}: cannot be opened ({e.strerror})") from None
    with os.fdopen(fd, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise CacheError(f"{path}: not a regular file")
        if st.st_size != entry["bytes"]:
            raise CacheError(f"{path}: {st.st_size} bytes, the manifest says {entry['bytes']} (truncated or replaced)")
        data = bytearray(entry["bytes"])
        got = f.readinto(data)
        while got < len(data):  # a short read: keep reading until EOF
            more = f.readinto(memoryview(data)[got:])
            if not more:
                raise CacheError(f"{path}: ended after {got} of {entry['bytes']} bytes (truncated while read)")
            got += more
    if verify and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CacheError(f"{path}: sha256 mismatch (the shard is corrupt)")
    arrays = _tensors(path, data, _format.shard_layout(meta, entry["num_tokens"], entry.get("num_entries")))
    if _codec.ragged(meta):
        why = _codec.check_ragged(arrays, meta, entry["num_tokens"], entry["num_entries"])
        if why:
            raise CacheError(f"{path}: {why} (a corrupt or forged shard)")
    return arrays


def _tensors(path: str, data: bytearray, layout: dict) -> dict:
    size = len(data)
    (header_len,) = struct.unpack_from("<Q", data, 0)
    if not 2 <= header_len <= size - 8:
        raise CacheError(f"{path}: shard header length {header_len} does not fit a {size}-byte file")
    try:
        header = json.loads(bytes(data[8:8 + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CacheError(f"{path}: corrupt shard header ({e})") from None
    if not isinstance(header, dict) or set(header) - {"__metadata__"} != set(layout):
        raise CacheError(f"{path}: shard holds tensors {sorted(header) if isinstance(header, dict) else header!r}, "
                         f"the manifest implies {sorted(layout)}")
    base, offset, out = 8 + header_len, 0, {}
    for name in sorted(layout):  # fastkd writes tensors in name order, back to back
        info, (dtype, shape) = header[name], layout[name]
        want = {"dtype": dtype, "shape": shape}
        if not isinstance(info, dict) or {key: info.get(key) for key in want} != want:
            raise CacheError(f"{path}: tensor {name!r} is {info!r}, the manifest implies {want}")
        nbytes = _DTYPES[dtype].itemsize * _numel(shape)
        if info.get("data_offsets") != [offset, offset + nbytes]:
            raise CacheError(f"{path}: tensor {name!r} has data_offsets {info.get('data_offsets')!r}, "
                             f"the layout puts it at {[offset, offset + nbytes]}")
        t = torch.frombuffer(data, dtype=_DTYPES[dtype], count=_numel(shape), offset=base + offset) \
            if nbytes else torch.empty(0, dtype=_DTYPES[dtype])
        out[name] = t.view(shape)
        offset += nbytes
    if base + offset != size:
        raise CacheError(f"{path}: the tensors end at byte {base + offset} of {size}")
    return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
