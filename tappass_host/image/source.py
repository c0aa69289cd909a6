"""Where an image comes from: the ImageSource interface and its local kinds.

    oci:DIR[:TAG]              an OCI image layout directory (image-spec layout.md)
    oci-archive:FILE[:TAG]     the same layout in a tar file
    docker-archive:FILE        what `docker save` / `podman save` write
    sha256:<hex>               an image already in the local store

A source only finds bytes: `resolve` names the image's root descriptor (an
index or a manifest) and `open_blob` hands out a blob's bytes. It checks
nothing about them: the store verifies every blob against its descriptor
before using it. A registry source fits the same two calls (resolve a
tag to a descriptor, fetch a blob by digest).

Readers of our own rather than skopeo: a layout and the two archive formats
are a JSON file and a tar of named members, tarfile reads them in place
without a converted copy, and the verification and unpacking that guard
the host are the store's in any case.
"""

import io
import os
import platform
import stat
import tarfile
from pathlib import Path
from typing import BinaryIO, Protocol

from tappass_host import paths as names
from tappass_host import strictjson
from tappass_host.image import ImageError
from tappass_host.image.manifest import (
    DIGEST,
    MANIFESTS,
    MAX_DOCUMENT_BYTES,
    OCI_CONFIG,
    OCI_MANIFEST,
    REF_NAME,
    Descriptor,
    check_digest,
    digest_of,
    document,
    index_entries,
    select,
)
from tappass_host.paths import HostPaths

MAX_ARCHIVE_MEMBERS = 100_000
KINDS = ("oci", "oci-archive", "docker-archive", "sha256")
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"


class ImageSourceError(ImageError):
    """An image source cannot be read or does not name one image."""


class ImageSource(Protocol):
    reference: str  # as the user gave it
    name: str | None  # the image's name in the source (a tag or repository:tag), if any

    def resolve(self) -> Descriptor:
        """The descriptor of the image's root (an image index or manifest)."""

    def open_blob(self, descriptor: Descriptor) -> BinaryIO:
        """The bytes of a blob, unverified; ImageSourceError if the source lacks it."""

    def close(self) -> None: ...


def host_architecture() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def _read_capped(f: BinaryIO, what: str) -> bytes:
    data = f.read(MAX_DOCUMENT_BYTES + 1)
    if len(data) > MAX_DOCUMENT_BYTES:
        raise ImageSourceError(f"{what} is over {MAX_DOCUMENT_BYTES // (1024 * 1024)} MiB")
    return data


def _index_descriptor(data: bytes, tag: str | None, what: str) -> Descriptor:
    """The image index.json names for `tag`: the layout's entry point, trusted
    because the user chose the layout (its blobs are then verified)."""
    synthetic = Descriptor("application/vnd.oci.image.index.v1+json", digest_of(data), len(data))
    doc = document(data, synthetic, what)
    return select(index_entries(doc, what), tag, host_architecture(), what)


def _split_tag(text: str) -> tuple[str, str | None]:
    """`PATH[:TAG]`: a path that exists as given has no tag."""
    path, sep, tag = text.rpartition(":")
    if not sep or os.path.exists(text) or "/" in tag or not tag:
        return text, None
    return path, tag


class LayoutSource:
    """An OCI image layout directory."""

    def __init__(self, reference: str, directory: Path, tag: str | None):
        self.reference, self.directory, self.tag = reference, directory, tag
        self.name = tag
        self._check_layout(self._read(names.OCI_LAYOUT_MARKER))

    def _open(self, rel: str) -> BinaryIO:
        try:
            fd = os.open(self.directory / rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise ImageSourceError(f"{self.reference}: cannot read {rel}: "
                                   f"{exc.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ImageSourceError(f"{self.reference}: {rel} is not a regular file")
        return os.fdopen(fd, "rb")

    def _read(self, rel: str) -> bytes:
        with self._open(rel) as f:
            return _read_capped(f, f"{self.reference}: {rel}")

    def _check_layout(self, data: bytes) -> None:
        try:
            version = strictjson.loads(data).get("imageLayoutVersion")
        except (strictjson.StrictJSONError, AttributeError):
            version = None
        if not isinstance(version, str) or not version.startswith("1."):
            raise ImageSourceError(f"{self.reference} is not an OCI image layout "
                                   f"({names.OCI_LAYOUT_MARKER} lacks imageLayoutVersion 1.x)")

    def resolve(self) -> Descriptor:
        descriptor = _index_descriptor(self._read(names.OCI_LAYOUT_INDEX), self.tag,
                                       f"{self.reference}: {names.OCI_LAYOUT_INDEX}")
        self.name = self.name or descriptor.annotations.get(REF_NAME)
        return descriptor

    def open_blob(self, descriptor: Descriptor) -> BinaryIO:
        return self._open(names.oci_layout_blob(descriptor.hex))

    def close(self) -> None:
        pass


class _Archive:
    """The regular files of a tar archive, read in place."""

    def __init__(self, reference: str, file: Path):
        self.reference = reference
        try:
            self.tar = tarfile.open(file, mode="r:")
        except (OSError, tarfile.TarError) as exc:
            raise ImageSourceError(f"{reference}: not a readable tar archive "
                                   f"({getattr(exc, 'strerror', None) or exc})") from None
        self.members: dict[str, tarfile.TarInfo] = {}
        try:
            for count, member in enumerate(self.tar, 1):
                if count > MAX_ARCHIVE_MEMBERS:
                    raise ImageSourceError(f"{reference} has over {MAX_ARCHIVE_MEMBERS} members")
                if member.isreg():
                    self.members["/".join(p for p in member.name.split("/") if p not in ("", "."))
                                 ] = member
                self.tar.members.clear()  # self.members keeps the regular files only
        except tarfile.TarError as exc:
            self.tar.close()
            raise ImageSourceError(f"{reference}: not a readable tar archive ({exc})") from None

    def open(self, name: str) -> BinaryIO:
        member = self.members.get(name)
        if member is None:
            raise ImageSourceError(f"{self.reference} has no {name[:200]}")
        return self.tar.extractfile(member)

    def read(self, name: str) -> bytes:
        with self.open(name) as f:
            return _read_capped(f, f"{self.reference}: {name[:200]}")

    def close(self) -> None:
        self.tar.close()


class OCIArchiveSource:
    """An OCI image layout in a tar file."""

    def __init__(self, reference: str, file: Path, tag: str | None):
        self.reference, self.tag, self.name = reference, tag, tag
        self.archive = _Archive(reference, file)
        if names.OCI_LAYOUT_MARKER not in self.archive.members:
            self.archive.close()
            raise ImageSourceError(f"{reference} is not an OCI archive (no "
                                   f"{names.OCI_LAYOUT_MARKER})")

    def resolve(self) -> Descriptor:
        descriptor = _index_descriptor(self.archive.read(names.OCI_LAYOUT_INDEX), self.tag,
                                       f"{self.reference}: {names.OCI_LAYOUT_INDEX}")
        self.name = self.name or descriptor.annotations.get(REF_NAME)
        return descriptor

    def open_blob(self, descriptor: Descriptor) -> BinaryIO:
        return self.archive.open(names.oci_layout_blob(descriptor.hex))

    def close(self) -> None:
        self.archive.close()


class DockerArchiveSource:
    """`docker save` output: manifest.json names a config file and layer tars.

    It has no image manifest, so this source writes one (canonical JSON, the
    config's digest, each layer as an uncompressed tar whose digest is the
    config's diff_id): the same archive always gives the same image digest.
    A layer that is not that tar fails the store's digest check."""

    def __init__(self, reference: str, file: Path):
        self.reference = reference
        self.archive = _Archive(reference, file)
        self.name = None
        self._manifest: bytes | None = None
        self._config_name = ""
        self._layer_names: dict[str, str] = {}

    def _entry(self) -> dict:
        what = f"{self.reference}: {names.DOCKER_ARCHIVE_MANIFEST}"
        try:
            entries = strictjson.loads(self.archive.read(names.DOCKER_ARCHIVE_MANIFEST))
        except strictjson.StrictJSONError as exc:
            raise ImageSourceError(f"{what} is not strict JSON: {exc}") from None
        if not isinstance(entries, list) or len(entries) != 1 or not isinstance(entries[0], dict):
            raise ImageSourceError(f"{what} must list exactly one image")
        entry = entries[0]
        layers = entry.get("Layers")
        if not isinstance(entry.get("Config"), str) or not isinstance(layers, list) or not all(
                isinstance(layer, str) for layer in layers):
            raise ImageSourceError(f"{what} lacks Config and Layers")
        return entry

    def resolve(self) -> Descriptor:
        entry = self._entry()
        config = self.archive.read(entry["Config"])
        try:
            rootfs = strictjson.loads(config).get("rootfs", {})
            diff_ids = rootfs.get("diff_ids")
        except (strictjson.StrictJSONError, AttributeError):
            diff_ids = None
        if not isinstance(diff_ids, list) or len(diff_ids) != len(entry["Layers"]) or not all(
                isinstance(d, str) and DIGEST.fullmatch(d) for d in diff_ids):
            raise ImageSourceError(f"{self.reference}: the config's rootfs.diff_ids do not "
                                   f"match {names.DOCKER_ARCHIVE_MANIFEST}'s Layers")
        self._config_name = entry["Config"]
        layers = []
        for layer_name, diff_id in zip(entry["Layers"], diff_ids):
            member = self.archive.members.get(layer_name)
            if member is None:
                raise ImageSourceError(f"{self.reference} has no {layer_name[:200]}")
            self._layer_names[diff_id] = layer_name
            layers.append({"mediaType": LAYER_TAR, "digest": diff_id, "size": member.size})
        self._manifest = strictjson.canonical({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": digest_of(config),
                       "size": len(config)},
            "layers": layers})
        tags = entry.get("RepoTags")
        if isinstance(tags, list) and tags and isinstance(tags[0], str):
            self.name = tags[0]
        return Descriptor(OCI_MANIFEST, digest_of(self._manifest), len(self._manifest))

    def open_blob(self, descriptor: Descriptor) -> BinaryIO:
        if self._manifest is not None and descriptor.digest == digest_of(self._manifest):
            return io.BytesIO(self._manifest)
        if descriptor.media_type == OCI_CONFIG:
            return self.archive.open(self._config_name)
        if descriptor.digest in self._layer_names:
            return self.archive.open(self._layer_names[descriptor.digest])
        raise ImageSourceError(f"{self.reference} has no blob {descriptor.digest[:19]}")

    def close(self) -> None:
        self.archive.close()


class StoreSource:
    """An image already in the local store, named by its digest."""

    def __init__(self, reference: str, paths: HostPaths):
        self.reference, self.paths, self.name = reference, paths, None
        self.digest = check_digest(reference)

    def resolve(self) -> Descriptor:
        hex_digest = self.digest.removeprefix("sha256:")
        try:
            data = (self.paths.image_blobs / hex_digest).read_bytes()
        except FileNotFoundError:
            raise ImageSourceError(f"image {self.digest} is not in the local store "
                                   "(see 'tappass-host image ls')") from None
        try:
            media_type = strictjson.loads(data).get("mediaType") or OCI_MANIFEST
        except (strictjson.StrictJSONError, AttributeError):
            media_type = OCI_MANIFEST
        if media_type not in MANIFESTS:
            raise ImageSourceError(f"{self.digest} in the local store is not an image manifest")
        return Descriptor(media_type, self.digest, len(data))

    def open_blob(self, descriptor: Descriptor) -> BinaryIO:
        try:
            return open(self.paths.image_blobs / descriptor.hex, "rb")
        except FileNotFoundError:
            raise ImageSourceError(f"blob {descriptor.digest[:19]} is not in the local "
                                   "store") from None

    def close(self) -> None:
        pass


def open_source(reference: str, paths: HostPaths) -> ImageSource:
    """The source `reference` names (see the module doc); ImageSourceError if none."""
    kind, sep, rest = reference.partition(":")
    if not sep or kind not in KINDS or not rest:
        raise ImageSourceError(f"{reference[:200]!r} is not an image source: use oci:DIR[:TAG], "
                               "oci-archive:FILE[:TAG], docker-archive:FILE or sha256:<digest>")
    if kind == "sha256":
        return StoreSource(reference, paths)
    if kind == "docker-archive":
        return DockerArchiveSource(reference, Path(rest))
    path, tag = _split_tag(rest)
    if kind == "oci":
        if not os.path.isdir(path):
            raise ImageSourceError(f"{reference}: {path} is not a directory")
        return LayoutSource(reference, Path(path), tag)
    return OCIArchiveSource(reference, Path(path), tag)
