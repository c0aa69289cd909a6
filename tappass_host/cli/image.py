"""`tappass-host image import | ls | rm | prune`: the local image store
(tappass_host/image/store.py)."""

import sys

import click

from tappass_host.cli import pass_host

MiB = 1024 * 1024


@click.group()
def image():
    """Agent images in the local store.

    An image is imported once from a local source, verified blob by blob
    (sha256 and size against its descriptor) and its layers unpacked, under
    strict rules, into a read-only root that every sandbox using it shares.
    It is named by its manifest digest (sha256:...), which is what a keyring
    pins. Sources:

    \b
      oci:DIR[:TAG]            an OCI image layout directory
      oci-archive:FILE[:TAG]   the same in a tar file (podman save --format oci-archive)
      docker-archive:FILE      docker save / podman save output
      sha256:<digest>          an image already in the store
    """


def _store(host):
    from tappass_host.image.store import ImageStore
    from tappass_host.image.unpack import Limits

    return ImageStore(host.paths, Limits.from_config(host.config))


def _summary(record, users=()) -> dict:
    return {"digest": record.digest, "config_digest": record.config_digest,
            "names": record.names, "size": record.size,
            "unpacked_bytes": record.unpacked_bytes, "imported_at": record.imported_at,
            "architecture": record.architecture, "skipped": record.skipped,
            "used_by": sorted(users)}


def _progress(host):
    """Progress on stderr when it is a terminal (and not --json)."""
    if host.json or not sys.stderr.isatty():
        return None

    def show(phase: str, done: int, total: int) -> None:
        click.echo(f"\r{phase:>6}: {done / MiB:8.1f} / {total / MiB:.1f} MiB", nl=False, err=True)
        if done >= total:
            click.echo("", err=True)

    return show


@image.command("import")
@click.argument("source")
@pass_host
def import_(host, source):
    """Import SOURCE into the local store and print its digest."""
    from tappass_host.image.source import open_source

    store = _store(host)
    opened = open_source(source, host.paths)
    try:
        imported = store.import_image(opened, _progress(host))
    finally:
        opened.close()
    record = imported.record
    skipped = "".join(f", skipped {n} {kind}" for kind, n in sorted(record.skipped.items()))
    how = "imported" if imported.new else "already in the store:"
    host.emit({**_summary(record), "new": imported.new},
              f"{how} {record.digest} ({record.unpacked_bytes / MiB:.1f} MiB unpacked{skipped})")


@image.command("ls")
@pass_host
def ls(host):
    """List the images in the local store and the sandboxes that name them."""
    from tappass_host.image.store import images_in_use

    used = images_in_use(host.paths)
    records = _store(host).records()
    rows = [_summary(r, used.get(r.digest, ())) for r in records]
    lines = [f"{'DIGEST':<20} {'NAMES':<30} {'UNPACKED':>10}  USED BY"] + [
        f"{r['digest'][:19]:<20} {','.join(r['names']) or '-':<30} "
        f"{r['unpacked_bytes'] / MiB:>8.1f}M  {','.join(r['used_by']) or '-'}" for r in rows]
    host.emit(rows, "\n".join(lines) if rows else "no images")


@image.command("rm")
@click.argument("digest")
@pass_host
def rm(host, digest):
    """Remove image DIGEST (sha256:...) unless a sandbox names it."""
    record = _store(host).remove(digest)
    host.emit({"removed": [record.digest]}, f"removed {record.digest}")


@image.command("prune")
@pass_host
def prune(host):
    """Remove every image that no sandbox's record names."""
    removed = _store(host).prune()
    host.emit({"removed": [r.digest for r in removed]},
              "\n".join(f"removed {r.digest}" for r in removed) or "nothing to prune")
