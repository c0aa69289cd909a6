"""The local image store under the state directory (paths.HostPaths.images, 0700):

    store.lock            held by every import, rm and prune
    blobs/sha256/<hex>    verified blobs: index, manifest, config and layers
    images/<hex>.json     one record per image, <hex> of its manifest digest;
                          an image is in the store exactly when its record is
    rootfs/<hex>/         an image's layers unpacked once, <hex> of its config
                          digest (the image ID: its diff_ids fix the root's
                          content), shared read-only by every sandbox using an
                          image of that config, whichever source it came from
    staging/<tmp>/        one import in progress: blobs/, rootfs/

An import verifies before it uses: every blob's size and sha256 against the
descriptor that named it (index -> manifest -> config -> layers), each
document's media type and size (manifest.py), each layer's unpacked bytes
against the config's diff_id (unpack.py). It writes only into its staging
directory, then commits: blobs renamed in, the rootfs renamed in, the record
written atomically last. A refused import removes its staging directory; a
crashed one leaves staging files or an unrecorded rootfs/blobs, which the next
locked operation sweeps, so the list of images is always as it was or the new
one complete.

A sandbox names the image it runs in its record (sandbox.json `"image":
"sha256:<hex>"`, written by `start`); an image no record names is unused:
`prune` removes those, and `rm` refuses an image a sandbox names.
"""

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tappass_host import clock, libc, sandbox_record, statefile, strictjson
from tappass_host import paths as names
from tappass_host.errors import TappassError
from tappass_host.image import ImageError
from tappass_host.image.manifest import (
    INDEXES,
    MANIFESTS,
    MAX_DOCUMENT_BYTES,
    Descriptor,
    ImageRejected,
    check_digest,
    document,
    image_config,
    index_entries,
    manifest,
    select,
)
from tappass_host.image.source import ImageSource, host_architecture
from tappass_host.image.unpack import Budget, Limits, unpack_layer
from tappass_host.paths import HostPaths

CHUNK = 1024 * 1024
HEX = re.compile(r"[0-9a-f]{64}")
HEX_PREFIX = re.compile(r"[0-9a-f]{12,64}")
MAX_NESTED_INDEXES = 2

# (phase, bytes done, bytes in all): phase "fetch" counts blob bytes copied
# in, "unpack" compressed layer bytes unpacked.
Progress = Callable[[str, int, int], None]


def _syncfs(fd: int) -> None:
    """One syncfs for a whole unpacked tree instead of an fsync per file."""
    libc.syncfs(fd)


class ImageStoreError(ImageError):
    """The store refuses an operation (an image in use, not in the store)."""


@dataclass
class ImageRecord:
    digest: str  # the manifest's: what a keyring pins and a sandbox names
    config_digest: str
    names: list[str]
    blobs: list[str]  # every blob of the image: index(es), manifest, config, layers
    layers: list[str]
    size: int  # bytes of its blobs
    unpacked_bytes: int
    imported_at: str
    architecture: str
    process: dict[str, Any] = field(default_factory=dict)  # Env, Entrypoint, Cmd, WorkingDir, User
    skipped: dict[str, int] = field(default_factory=dict)  # device nodes, fifos not unpacked

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, where: Path) -> "ImageRecord":
        try:
            doc = strictjson.loads(data)
            return cls(**doc)
        except (strictjson.StrictJSONError, TypeError):
            raise ImageStoreError(f"{where} is not an image record") from None


@dataclass(frozen=True)
class Imported:
    record: ImageRecord
    new: bool  # False: the store had it; nothing was unpacked again


def images_in_use(paths: HostPaths) -> dict[str, list[str]]:
    """digest -> the sandboxes whose record names it."""
    used: dict[str, list[str]] = {}
    for name in paths.sandbox_names():
        try:
            image = sandbox_record.load(paths, name).extra.get("image")
        except TappassError:
            continue
        if isinstance(image, str):
            used.setdefault(image, []).append(name)
    return used


class _Import:
    def __init__(self, store: "ImageStore", source: ImageSource, staging: Path,
                 progress: Progress | None):
        self.store, self.source, self.staging = store, source, staging
        self.blobs_dir = staging / names.IMAGE_STAGING_BLOBS
        self.blobs_dir.mkdir()
        self.progress = progress or (lambda phase, done, total: None)
        self.fetched: list[Descriptor] = []
        self.done = 0
        self.total = 0

    def blob_path(self, descriptor: Descriptor) -> Path:
        stored = self.store.paths.image_blobs / descriptor.hex
        return stored if stored.is_file() else self.blobs_dir / descriptor.hex

    def fetch(self, descriptor: Descriptor, what: str) -> Path:
        """The blob, verified against `descriptor`, in the store or staging."""
        self.fetched.append(descriptor)
        path = self.blob_path(descriptor)
        if path.is_file():  # in the store (verified when it came in), or fetched already
            self.done += descriptor.size
            self.progress("fetch", self.done, self.total)
            return path
        digest = hashlib.sha256()
        size = 0
        with self.source.open_blob(descriptor) as blob, open(path, "xb") as out:
            while data := blob.read(CHUNK):
                size += len(data)
                if size > descriptor.size:
                    raise ImageRejected("size", f"{what} {descriptor.digest[:19]} is larger "
                                                f"than its descriptor's {descriptor.size} bytes")
                digest.update(data)
                out.write(data)
                self.done += len(data)
                self.progress("fetch", self.done, self.total)
            out.flush()
            os.fsync(out.fileno())
        if size != descriptor.size:
            raise ImageRejected("size", f"{what} {descriptor.digest[:19]} is {size} bytes, its "
                                        f"descriptor says {descriptor.size}")
        if "sha256:" + digest.hexdigest() != descriptor.digest:
            raise ImageRejected("digest", f"{what} does not match its digest "
                                          f"{descriptor.digest[:19]}…")
        return path

    def document(self, descriptor: Descriptor, what: str) -> dict:
        if descriptor.size > MAX_DOCUMENT_BYTES:
            raise ImageRejected("too_large", f"{what} is {descriptor.size} bytes, over "
                                             f"{MAX_DOCUMENT_BYTES // (1024 * 1024)} MiB")
        self.total += descriptor.size
        return document(self.fetch(descriptor, what).read_bytes(), descriptor, what)

    def manifest_descriptor(self) -> Descriptor:
        descriptor = self.source.resolve()
        for _ in range(MAX_NESTED_INDEXES + 1):
            if descriptor.media_type in MANIFESTS:
                return descriptor
            if descriptor.media_type not in INDEXES:
                raise ImageRejected("media_type", f"{self.source.reference} names media type "
                                                  f"{descriptor.media_type[:80]!r}, not an "
                                                  "image")
            entries = index_entries(self.document(descriptor, "image index"), "image index")
            descriptor = select(entries, None, host_architecture(), "image index")
        raise ImageRejected("malformed", f"more than {MAX_NESTED_INDEXES} nested image indexes")

    def run(self, manifest_descriptor: Descriptor) -> ImageRecord:
        image = manifest(self.document(manifest_descriptor, "manifest"), "manifest")
        config = image_config(self.document(image.config, "config"), len(image.layers), "config")
        limits = self.store.limits
        for i, layer in enumerate(image.layers):
            if layer.size > limits.max_unpacked_bytes:
                raise ImageRejected("too_large", f"layer {i} is {layer.size} bytes, over the "
                                                 f"{limits.max_unpacked_bytes} bytes an image "
                                                 "may unpack to")
        self.total += sum(layer.size for layer in image.layers)
        layer_paths = [self.fetch(layer, f"layer {i}") for i, layer in enumerate(image.layers)]
        same_root = [r for r in self.store.records() if r.config_digest == image.config.digest]
        if same_root:  # unpacked already, from an image of the same config
            budget = Budget(limits, same_root[0].unpacked_bytes, 0, dict(same_root[0].skipped))
        else:
            budget = self.unpack(image, config, layer_paths)
        blobs = list(dict.fromkeys(d.digest for d in self.fetched))
        return ImageRecord(
            digest=manifest_descriptor.digest, config_digest=image.config.digest,
            names=[self.source.name] if self.source.name else [], blobs=blobs,
            layers=[layer.digest for layer in image.layers],
            size=sum({d.digest: d.size for d in self.fetched}.values()),
            unpacked_bytes=budget.unpacked_bytes, imported_at=clock.now_text(),
            architecture=config.architecture,
            process={k: v for k, v in config.process.items()
                     if k in ("Env", "Entrypoint", "Cmd", "WorkingDir", "User")},
            skipped=dict(budget.skipped))

    def unpack(self, image, config, layer_paths: list[Path]) -> Budget:
        rootfs = self.staging / names.IMAGE_STAGING_ROOTFS
        rootfs.mkdir(mode=0o755)
        root_fd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        budget = Budget(self.store.limits)
        unpacked = 0
        layers_total = sum(layer.size for layer in image.layers)
        try:
            for layer, path, diff_id in zip(image.layers, layer_paths, config.diff_ids):
                with open(path, "rb") as blob:
                    unpack_layer(blob, layer.media_type, diff_id, root_fd, budget)
                unpacked += layer.size
                self.progress("unpack", unpacked, layers_total)
            os.fchmod(root_fd, 0o755)
            _syncfs(root_fd)  # the rootfs, before the record says it is there
        finally:
            os.close(root_fd)
        return budget


class ImageStore:
    def __init__(self, paths: HostPaths, limits: Limits):
        self.paths = paths
        self.limits = limits

    def _prepare(self) -> None:
        self.paths.state.mkdir(parents=True, exist_ok=True)
        self.paths.images.mkdir(mode=0o700, exist_ok=True)
        for directory in (self.paths.image_blobs, self.paths.image_records,
                          self.paths.image_rootfs_dir, self.paths.image_staging):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _locked(self):
        self._prepare()
        return statefile.locked(self.paths.image_lock)

    def records(self) -> list[ImageRecord]:
        try:
            files = sorted(self.paths.image_records.iterdir())
        except FileNotFoundError:
            return []
        return [ImageRecord.from_json(f.read_bytes(), f) for f in files
                if HEX.fullmatch(f.stem) and f == self.paths.image_record(f.stem)]

    def get(self, digest: str) -> ImageRecord:
        """The image `digest` names: in full, or by 12 or more of its first hex digits."""
        short = digest.removeprefix("sha256:")
        if HEX_PREFIX.fullmatch(short) and len(short) < 64:
            matches = [r for r in self.records() if r.digest[7:].startswith(short)]
            if len(matches) == 1:
                return matches[0]
            if matches:
                raise ImageStoreError(f"{digest} names {len(matches)} images; give more digits")
        digest = check_digest(digest)
        where = self.paths.image_record(digest.removeprefix("sha256:"))
        try:
            return ImageRecord.from_json(where.read_bytes(), where)
        except FileNotFoundError:
            raise ImageStoreError(f"image {digest} is not in the local store") from None

    def rootfs(self, digest: str) -> Path:
        """The unpacked root of image `digest`."""
        return self.paths.image_rootfs(self.get(digest).config_digest.removeprefix("sha256:"))

    def import_image(self, source: ImageSource, progress: Progress | None = None) -> Imported:
        with self._locked():
            self._sweep()
            staging = Path(tempfile.mkdtemp(dir=self.paths.image_staging))
            try:
                job = _Import(self, source, staging, progress)
                descriptor = job.manifest_descriptor()
                record_path = self.paths.image_record(descriptor.hex)
                if record_path.is_file():
                    return Imported(self._add_name(record_path, source.name), new=False)
                record = job.run(descriptor)
                self._commit(staging, record)
                return Imported(record, new=True)
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def _add_name(self, record_path: Path, name: str | None) -> ImageRecord:
        record = ImageRecord.from_json(record_path.read_bytes(), record_path)
        if name and name not in record.names:
            record.names.append(name)
            statefile.write_atomic(record_path, record.to_json(), 0o600)
        return record

    def _commit(self, staging: Path, record: ImageRecord) -> None:
        for blob in (staging / names.IMAGE_STAGING_BLOBS).iterdir():
            target = self.paths.image_blobs / blob.name
            if not target.exists():
                os.rename(blob, target)
        statefile.fsync_dir(self.paths.image_blobs)
        hex_digest = record.digest.removeprefix("sha256:")
        unpacked = staging / names.IMAGE_STAGING_ROOTFS
        if unpacked.is_dir():
            config_hex = record.config_digest.removeprefix("sha256:")
            os.rename(unpacked, self.paths.image_rootfs(config_hex))
            statefile.fsync_dir(self.paths.image_rootfs_dir)
        statefile.write_atomic(self.paths.image_record(hex_digest), record.to_json(), 0o600)

    def _sweep(self) -> None:
        """Remove what a crashed import or removal left: staging directories,
        roots without a record, blobs no record names."""
        for leftover in self.paths.image_staging.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
        records = self.records()
        recorded = {r.config_digest.removeprefix("sha256:") for r in records}
        for root in self.paths.image_rootfs_dir.iterdir():
            if root.name not in recorded:
                shutil.rmtree(root)
        referenced = {d.removeprefix("sha256:") for r in records for d in r.blobs}
        for blob in self.paths.image_blobs.iterdir():
            if blob.name not in referenced:
                blob.unlink()

    def remove(self, digest: str) -> ImageRecord:
        with self._locked():
            record = self.get(digest)
            users = images_in_use(self.paths).get(record.digest)
            if users:
                raise ImageStoreError(f"image {record.digest} is used by sandbox(es) "
                                      f"{', '.join(users)}; it stays")
            self._remove(record)
            return record

    def _remove(self, record: ImageRecord) -> None:
        hex_digest = record.digest.removeprefix("sha256:")
        os.unlink(self.paths.image_record(hex_digest))  # from here the image is gone
        statefile.fsync_dir(self.paths.image_records)
        self._sweep()

    def prune(self) -> list[ImageRecord]:
        """Remove every image no sandbox record names; returns them."""
        with self._locked():
            self._sweep()
            used = images_in_use(self.paths)
            removed = [r for r in self.records() if r.digest not in used]
            for record in removed:
                self._remove(record)
            return removed

