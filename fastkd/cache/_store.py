"""Files of a cache directory: the JSON manifest and the safetensors shards (docs/cache-format.md).

Every file is written atomically (to `<name>.tmp`, fsync, rename, fsync the directory), so a
killed writer leaves either the old file or the new one, never half of one. Shards are read by
memory-mapping them; each is checked against the sha256 that the manifest records for it before
any of its bytes are used. Nothing is unpickled.
"""
import hashlib
import json
import mmap
import os
import struct

import torch

MANIFEST = "manifest.json"
FORMAT = "fastkd-teacher-cache"
FORMAT_VERSION = 1
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
    """The manifest of the cache in `directory`, checked for format, version and its checksum."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise CacheError(f"{directory!r} is not a fastkd teacher cache: {MANIFEST} not found")
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"{path}: corrupt manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{path}: format version {manifest.get('format_version')!r}; this fastkd "
                         f"reads version {FORMAT_VERSION}")
    if manifest.get("checksum") != _manifest_digest(manifest):
        raise CacheError(f"{path}: checksum mismatch (the manifest was modified or corrupted)")
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


def open_shard(directory: str, entry: dict, verify: bool = True) -> dict:
    """Memory-map one shard -> {name: tensor} viewing the mapping (copy-on-write, never written)."""
    path = os.path.join(directory, entry["file"])
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != entry["bytes"]:
                raise CacheError(f"{path}: {size} bytes, the manifest says {entry['bytes']} "
                                 "(truncated or replaced)")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except FileNotFoundError:
        raise CacheError(f"{path}: shard listed in the manifest is missing") from None
    if verify and hashlib.sha256(mm).hexdigest() != entry["sha256"]:
        raise CacheError(f"{path}: sha256 mismatch (the shard is corrupt)")
    (header_len,) = struct.unpack_from("<Q", mm, 0)
    try:
        header = json.loads(mm[8:8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"{path}: corrupt shard header ({e})") from None
    base, out = 8 + header_len, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        count = (end - begin) // dtype.itemsize
        t = torch.frombuffer(mm, dtype=dtype, count=count, offset=base + begin) if count else \
            torch.empty(0, dtype=dtype)
        out[name] = t.view(info["shape"])
    return out
