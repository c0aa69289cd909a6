"""Agent images: OCI images imported into a local store, verified, and
unpacked once into a read-only root shared by every sandbox that uses one.

    source.py    where an image comes from (oci:, oci-archive:, docker-archive:,
                 sha256: in the store); one small interface a registry fits later
    manifest.py  descriptors, index, manifest and config: parsed, size-capped, checked
    unpack.py    applying one layer under a root without ever leaving it
    store.py     the store: verified blobs, unpacked roots, atomic imports, rm, prune
"""

from tappass_host.errors import TappassError


class ImageError(TappassError):
    """An image cannot be imported, found or removed."""
