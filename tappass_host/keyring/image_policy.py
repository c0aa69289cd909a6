"""Which images a keyring lets a sandbox run: its `image` aspect.

    "image": {
      "allowed_digests": ["sha256:<hex>", ...],
      "allowed": [{"repository": "tappass/hello-agent", "digests": ["sha256:<hex>", ...]}]
    }

An image runs when its manifest digest (what `tappass-host image ls` shows) is
in `allowed_digests`, or is among the `digests` of the `allowed` entry whose
`repository` is the image's name without its tag (`tappass/hello-agent:1` ->
`tappass/hello-agent`; compared as written, no registry defaults). A keyring
without the aspect allows no image: a sandbox on the host's root needs none.
Pure functions of the payload: no files, no clock.
"""

import re
from dataclasses import dataclass

DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
REPOSITORY = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?::[0-9]+)?"
                        r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str  # why, in one line that names no secret (digests and names are not)

    def __bool__(self) -> bool:
        return self.allowed


def repository_of(name: str) -> str:
    """`name` without its `:tag` or `@digest` (a registry's `:port` stays)."""
    name = name.split("@", 1)[0]
    head, sep, tail = name.rpartition(":")
    return head if sep and "/" not in tail else name


def allowed(payload: dict, image_digest: str, repository: str | None = None) -> Verdict:
    """May the keyring `payload` (verified) run the image `image_digest`, named `repository`?"""
    aspect = payload.get("image")
    if not isinstance(aspect, dict):
        return Verdict(False, "the keyring allows no image (it has no image aspect)")
    if image_digest in aspect.get("allowed_digests", []):
        return Verdict(True, f"{image_digest} is in image.allowed_digests")
    name = repository_of(repository) if repository else None
    for i, entry in enumerate(aspect.get("allowed", [])):
        if name is not None and entry.get("repository") == name:
            if image_digest in entry.get("digests", []):
                return Verdict(True, f"{image_digest} is pinned for {name} in image.allowed[{i}]")
    pinned = f" or for {name}" if name else ""
    return Verdict(False, f"{image_digest} is not in image.allowed_digests{pinned}")


def problems(payload: dict):
    """The semantic problems of the image aspect (keyring.verify's rule `invalid`)."""
    aspect = payload.get("image", {})
    for i, digest in enumerate(aspect.get("allowed_digests", [])):
        if not DIGEST.fullmatch(digest):
            yield f"image.allowed_digests[{i}] is not sha256:<64 lowercase hex>"
    for i, entry in enumerate(aspect.get("allowed", [])):
        if not REPOSITORY.fullmatch(entry["repository"]):
            yield f"image.allowed[{i}].repository is not a repository name without a tag"
        for j, digest in enumerate(entry["digests"]):
            if not DIGEST.fullmatch(digest):
                yield f"image.allowed[{i}].digests[{j}] is not sha256:<64 lowercase hex>"
