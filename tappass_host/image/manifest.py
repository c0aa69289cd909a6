"""The OCI image's documents, read as hostile input: descriptors, the image
index, the image manifest and the image config (image-spec v1.1; the Docker
v2 schema 2 media types are read as their OCI equivalents).

Every document is strict JSON (strictjson) of at most MAX_DOCUMENT_BYTES and
is only parsed after its bytes matched the digest and size of the descriptor
that named it (the store does that). Only sha256 digests are accepted.
"""

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from tappass_host import strictjson
from tappass_host.image import ImageError

MAX_DOCUMENT_BYTES = 4 * 1024 * 1024  # index, manifest, config (containerd's cap too)
MAX_LAYERS = 256
MAX_INDEX_ENTRIES = 1024

DIGEST = re.compile(r"sha256:[0-9a-f]{64}")

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
INDEXES = (OCI_INDEX, DOCKER_LIST)
MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
CONFIGS = (OCI_CONFIG, DOCKER_CONFIG)

# A layer's media type -> its compression ("" for none).
LAYERS = {
    "application/vnd.oci.image.layer.v1.tar": "",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}

REF_NAME = "org.opencontainers.image.ref.name"


class ImageRejected(ImageError):
    """An image failed verification; `reason` is its code, the message one line."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"image rejected ({reason}): {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict, compare=False)
    platform: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")

    @classmethod
    def from_json(cls, doc: Any, where: str) -> "Descriptor":
        if not isinstance(doc, dict):
            raise ImageRejected("malformed", f"{where} is not a descriptor object")
        media_type, digest, size = doc.get("mediaType"), doc.get("digest"), doc.get("size")
        if not isinstance(media_type, str) or not media_type:
            raise ImageRejected("malformed", f"{where} has no mediaType")
        if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
            raise ImageRejected("digest", f"{where}'s digest is not sha256:<64 lowercase hex>")
        if type(size) is not int or size < 0:
            raise ImageRejected("malformed", f"{where}'s size is not a non-negative integer")
        annotations = doc.get("annotations") or {}
        if not isinstance(annotations, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
            raise ImageRejected("malformed", f"{where}'s annotations are not strings")
        platform = doc.get("platform")
        if platform is not None and not isinstance(platform, dict):
            raise ImageRejected("malformed", f"{where}'s platform is not an object")
        return cls(media_type, digest, size, annotations, platform)

    def to_json(self) -> dict:
        doc: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                               "size": self.size}
        if self.annotations:
            doc["annotations"] = self.annotations
        return doc


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(text: str) -> str:
    """`text` as a digest (`sha256:<hex>`, or the bare 64 hex), else ImageError."""
    digest = text if text.startswith("sha256:") else "sha256:" + text
    if not DIGEST.fullmatch(digest):
        raise ImageError(f"{text!r} is not an image digest (sha256:<64 lowercase hex>)")
    return digest


def document(data: bytes, descriptor: Descriptor, what: str) -> dict:
    """The JSON object `data`, whose bytes the caller matched against `descriptor`."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise ImageRejected("too_large", f"{what} is {len(data)} bytes, over "
                                         f"{MAX_DOCUMENT_BYTES // (1024 * 1024)} MiB")
    try:
        doc = strictjson.loads(data)
    except strictjson.StrictJSONError as exc:
        raise ImageRejected("malformed", f"{what} {descriptor.digest[:19]} is not strict "
                                         f"JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ImageRejected("malformed", f"{what} {descriptor.digest[:19]} is not a JSON object")
    media_type = doc.get("mediaType")
    if media_type is not None and media_type != descriptor.media_type:
        raise ImageRejected("media_type", f"{what} says mediaType {str(media_type)[:80]!r}, "
                                          f"its descriptor {descriptor.media_type!r}")
    return doc


def index_entries(doc: dict, what: str) -> list[Descriptor]:
    entries = doc.get("manifests")
    if doc.get("schemaVersion") != 2 or not isinstance(entries, list):
        raise ImageRejected("malformed", f"{what} is not an image index (schemaVersion 2 "
                                         "with manifests)")
    if len(entries) > MAX_INDEX_ENTRIES:
        raise ImageRejected("too_large", f"{what} lists {len(entries)} manifests, over "
                                         f"{MAX_INDEX_ENTRIES}")
    return [Descriptor.from_json(e, f"{what}.manifests[{i}]") for i, e in enumerate(entries)]


def select(entries: list[Descriptor], tag: str | None, arch: str, what: str) -> Descriptor:
    """The entry an index names for `tag` (or its only image), for this host's platform."""
    candidates = [e for e in entries if e.media_type in INDEXES + MANIFESTS]
    if tag is not None:
        candidates = [e for e in candidates if e.annotations.get(REF_NAME) == tag]
        if not candidates:
            raise ImageError(f"{what} has no image tagged {tag!r}")
    platformed = [e for e in candidates if e.platform is not None]
    if platformed and len(candidates) > 1:
        candidates = [e for e in platformed if e.platform.get("os") == "linux"
                      and e.platform.get("architecture") == arch] or candidates
    if len(candidates) != 1:
        tags = sorted({e.annotations[REF_NAME] for e in candidates if REF_NAME in e.annotations})
        hint = f"; name one of its tags: {', '.join(tags)}" if tags else ""
        raise ImageError(f"{what} holds {len(candidates) or 'no'} images, not one{hint}")
    return candidates[0]


@dataclass(frozen=True)
class Manifest:
    config: Descriptor
    layers: list[Descriptor]


def manifest(doc: dict, what: str) -> Manifest:
    if doc.get("schemaVersion") != 2:
        raise ImageRejected("malformed", f"{what} is not schemaVersion 2")
    config = Descriptor.from_json(doc.get("config"), f"{what}.config")
    if config.media_type not in CONFIGS:
        raise ImageRejected("media_type", f"{what}.config has media type "
                                          f"{config.media_type[:80]!r}, not an image config")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise ImageRejected("malformed", f"{what} has no layers list")
    if len(layers) > MAX_LAYERS:
        raise ImageRejected("too_large", f"{what} has {len(layers)} layers, over {MAX_LAYERS}")
    found = [Descriptor.from_json(e, f"{what}.layers[{i}]") for i, e in enumerate(layers)]
    for i, layer in enumerate(found):
        if layer.media_type not in LAYERS:
            raise ImageRejected("media_type", f"{what}.layers[{i}] has media type "
                                              f"{layer.media_type[:80]!r}, not a layer tar")
    return Manifest(config, found)


@dataclass(frozen=True)
class ImageConfig:
    os: str
    architecture: str
    diff_ids: list[str]
    process: dict[str, Any]  # the config's `config`: Env, Entrypoint, Cmd, WorkingDir, User


def image_config(doc: dict, layer_count: int, what: str) -> ImageConfig:
    rootfs = doc.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(
            isinstance(d, str) and DIGEST.fullmatch(d) for d in diff_ids):
        raise ImageRejected("malformed", f"{what} has no rootfs.diff_ids of sha256 digests")
    if len(diff_ids) != layer_count:
        raise ImageRejected("malformed", f"{what} names {len(diff_ids)} layer diff_ids, the "
                                         f"manifest {layer_count} layers")
    if doc.get("os") != "linux":
        raise ImageRejected("platform", f"{what} is for os {str(doc.get('os'))[:40]!r}, "
                                        "not linux")
    process = doc.get("config") or {}
    if not isinstance(process, dict):
        raise ImageRejected("malformed", f"{what}'s config is not an object")
    return ImageConfig("linux", str(doc.get("architecture", "")), diff_ids, process)
