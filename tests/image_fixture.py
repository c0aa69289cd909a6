"""Images built by the tests, without a registry: layers written entry by
entry with tarfile (so a test can craft any entry, hostile ones included),
stored as an OCI image layout, and repacked as an oci-archive and a
docker-archive by plain tar writing."""

import gzip
import hashlib
import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

BUSYBOX = Path("/bin/busybox")  # Debian busybox-static (scripts/setup)
OS_RELEASE = b'NAME="TapPass test image"\nID=tappass-test\nVERSION_ID=1\n'


@dataclass
class Entry:
    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    linkname: str = ""
    mode: int = 0o644
    size: int | None = None  # a header size other than len(data)
    pax: dict = field(default_factory=dict)
    devmajor: int = 0
    devminor: int = 0


def File(name, data=b"", mode=0o644, **kw):  # noqa: N802 - reads like a type in layer lists
    return Entry(name, tarfile.REGTYPE, data, mode=mode, **kw)


def Dir(name, mode=0o755):  # noqa: N802
    return Entry(name, tarfile.DIRTYPE, mode=mode)


def Symlink(name, target):  # noqa: N802
    return Entry(name, tarfile.SYMTYPE, linkname=target, mode=0o777)


def Hardlink(name, target):  # noqa: N802
    return Entry(name, tarfile.LNKTYPE, linkname=target)


def tar_layer(entries: list[Entry]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type, info.mode, info.linkname = e.type, e.mode, e.linkname
            info.size = len(e.data) if e.type == tarfile.REGTYPE else 0
            info.devmajor, info.devminor = e.devmajor, e.devminor
            info.mtime = 1_700_000_000
            info.pax_headers = dict(e.pax)
            if e.size is not None:
                info.size = e.size
                tar.addfile(info)  # header only: a lie about the size
                out.write(e.data)
            else:
                tar.addfile(info, io.BytesIO(e.data) if info.size else None)
    return out.getvalue()


def busybox_entries() -> list[Entry]:
    """A busybox-static root with an /etc/os-release of its own and an
    absolute symlink chain like Debian's alternatives."""
    return [
        Dir("bin"), Dir("etc"), Dir("etc/alternatives"), Dir("usr"), Dir("usr/bin"),
        Dir("tmp", 0o1777),
        File("bin/busybox", BUSYBOX.read_bytes(), 0o755),
        Symlink("bin/sh", "busybox"),
        Symlink("bin/cat", "busybox"),
        Symlink("etc/alternatives/awk", "/bin/busybox"),
        Symlink("usr/bin/awk", "/etc/alternatives/awk"),
        File("etc/os-release", OS_RELEASE),
    ]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Image:
    layout: Path
    digest: str  # the manifest's
    config: bytes
    layers: list[bytes]  # uncompressed tars


def _put_blob(layout: Path, data: bytes) -> dict:
    digest = sha256(data)
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / digest[7:]).write_bytes(data)
    return {"digest": digest, "size": len(data)}


def write_layout(layout: Path, layers: list[bytes], *, tag: str | None = "latest",
                 gzip_layers: bool = True, diff_ids: list[str] | None = None,
                 config_extra: dict | None = None, layer_media_type: str | None = None,
                 manifest_extra: dict | None = None) -> Image:
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids or [sha256(t) for t in layers]},
        **(config_extra or {})}).encode()
    layer_descriptors = []
    for tar in layers:
        blob = gzip.compress(tar, mtime=0) if gzip_layers else tar
        media = layer_media_type or ("application/vnd.oci.image.layer.v1.tar+gzip"
                                     if gzip_layers else "application/vnd.oci.image.layer.v1.tar")
        layer_descriptors.append({"mediaType": media, **_put_blob(layout, blob)})
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   **_put_blob(layout, config)},
        "layers": layer_descriptors, **(manifest_extra or {})}).encode()
    entry = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
             **_put_blob(layout, manifest)}
    if tag:
        entry["annotations"] = {"org.opencontainers.image.ref.name": tag}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    return Image(layout, entry["digest"], config, layers)


def oci_archive(layout: Path, file: Path) -> Path:
    with tarfile.open(file, "w") as tar:
        for path in sorted(layout.rglob("*")):
            tar.add(path, arcname=path.relative_to(layout).as_posix(), recursive=False)
    return file


def docker_archive(image: Image, file: Path, repo_tag: str = "tappass/busybox:1") -> Path:
    config_name = f"{sha256(image.config)[7:]}.json"
    layer_names = [f"{sha256(t)[7:]}/layer.tar" for t in image.layers]
    manifest = json.dumps([{"Config": config_name, "RepoTags": [repo_tag],
                            "Layers": layer_names}]).encode()
    with tarfile.open(file, "w") as tar:
        for name, data in [(config_name, image.config), *zip(layer_names, image.layers),
                           ("manifest.json", manifest)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return file


def busybox_image(layout: Path, **kw) -> Image:
    return write_layout(layout, [tar_layer(busybox_entries())], **kw)


def tree(root: Path) -> dict[str, tuple]:
    """Every path under `root` with its kind, mode, size and link target: a
    store is unchanged when this is."""
    found = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        found[path.relative_to(root).as_posix()] = (
            st.st_mode, st.st_size if not path.is_dir() else 0,
            str(path.readlink()) if path.is_symlink() else "")
    return found


def import_image(store, reference: str, progress=None):
    """`store.import_image` from the source `reference` names, closed after."""
    from tappass_host.image.source import open_source

    source = open_source(reference, store.paths)
    try:
        return store.import_image(source, progress)
    finally:
        source.close()


def _host_file(path: str, mode: int | None = None) -> Entry:
    """The host's file `path` (symlinks followed) as a layer entry of the same name."""
    real = Path(path).resolve()
    return File(path.lstrip("/"), real.read_bytes(), mode if mode is not None
                else real.stat().st_mode & 0o755)


SKIPPED_STDLIB = ("test", "idlelib", "tkinter", "turtledemo", "ensurepip", "site-packages",
                  "dist-packages", "lib2to3", "pydoc_data", "unittest", "distutils")


def python_entries(os_release: bytes = OS_RELEASE) -> list[Entry]:
    """A Debian-like root with the host's python3 (its binary, the libraries
    it and ctypes load, the standard library without tests) over busybox: what
    the escape probe needs, and nothing of the host's /usr besides."""
    import os
    import subprocess
    import sys

    python = os.path.realpath("/usr/bin/python3")
    libs = {line.split("=>")[-1].split("(")[0].strip()
            for binary in (python, *Path(sys.base_prefix, "lib", f"python{sys.version_info.major}."
                                            f"{sys.version_info.minor}", "lib-dynload")
                           .glob("_ctypes*.so"))
            for line in subprocess.run(["ldd", str(binary)], capture_output=True, text=True,
                                       check=True).stdout.splitlines() if "/" in line}
    dirs = sorted({str(Path(p).parent).lstrip("/") for p in [*libs, python]}
                  | {"usr", "usr/lib", "usr/bin", "lib", "etc", "tmp", "bin"})
    entries = [Dir(d) for d in dirs]
    entries += [_host_file(lib) for lib in sorted(libs)]
    entries += [_host_file(python, 0o755), Symlink("usr/bin/python3", Path(python).name),
                File("bin/busybox", BUSYBOX.read_bytes(), 0o755), Symlink("bin/sh", "busybox"),
                File("etc/os-release", os_release)]
    stdlib = Path(sys.base_prefix) / "lib" / Path(python).name
    for path in sorted(stdlib.rglob("*")):
        rel = path.relative_to(stdlib)
        if rel.parts[0] in SKIPPED_STDLIB or rel.parts[0].startswith("config-") or (
                "__pycache__" in rel.parts or rel.name.startswith(("_test", "xx", "_ctypes_test"))):
            continue
        name = f"usr/lib/{stdlib.name}/{rel.as_posix()}"
        if path.is_symlink():
            entries.append(Symlink(name, os.readlink(path)))
        elif path.is_dir():
            entries.append(Dir(name))
        else:
            entries.append(File(name, path.read_bytes(), path.stat().st_mode & 0o755))
    entries.append(Dir(f"usr/lib/{stdlib.name}"))
    return sorted(entries, key=lambda e: (e.type != tarfile.DIRTYPE, e.name))


def python_image(layout: Path, **kw) -> Image:
    return write_layout(layout, [tar_layer(python_entries())], gzip_layers=False, **kw)


DEBIAN_CACHE = Path("/var/tmp")  # survives the session; one rootfs tar a day
DEBIAN_MARK = b"VARIANT_ID=tappass-test\n"  # appended to the image's os-release


def debian_layer() -> bytes:
    """A Debian root (debootstrap --variant=minbase of the host's own release,
    with python3, from the host's apt mirror) as one uncompressed layer, its
    os-release marked (DEBIAN_MARK). debootstrap takes 1.5 min here: the tar
    is kept under DEBIAN_CACHE, keyed by date, older ones removed."""
    import datetime
    import os
    import subprocess
    import tempfile

    codename = _os_release("VERSION_CODENAME")
    day = datetime.date.today().strftime("%Y%m%d")
    prefix = f"tappass-test-debian-{codename}-python3-"
    cached = DEBIAN_CACHE / f"{prefix}{day}.tar"
    if not cached.exists():
        with tempfile.TemporaryDirectory(dir=DEBIAN_CACHE, prefix=prefix) as work:
            root = Path(work, "root")
            subprocess.run(["debootstrap", "--variant=minbase", "--include=python3", codename,
                            str(root), debian_mirror(codename)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            with open(root / "usr/lib/os-release", "ab") as f:
                f.write(DEBIAN_MARK)
            partial = Path(work, "layer.tar")
            subprocess.run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(partial),
                            "--exclude=./var/cache/apt/*", "--exclude=./var/lib/apt/lists/*",
                            "."], check=True)
            os.replace(partial, cached)
        for old in DEBIAN_CACHE.glob(f"{prefix}*.tar"):
            if old != cached:
                old.unlink(missing_ok=True)
    return cached.read_bytes()


def debian_mirror(codename: str) -> str:
    """The host's apt source for `codename` (deb822 .sources or sources.list)."""
    sources = Path("/etc/apt/sources.list.d")
    for file in sorted(sources.glob("*.sources")):
        for stanza in file.read_text().split("\n\n"):
            fields = dict(line.split(":", 1) for line in stanza.splitlines()
                          if ":" in line and not line.startswith(("#", " ")))
            if "deb" in fields.get("Types", "").split() and \
                    codename in fields.get("Suites", "").split():
                return fields["URIs"].split()[0]
    for file in [Path("/etc/apt/sources.list"), *sorted(sources.glob("*.list"))]:
        for line in file.read_text().splitlines() if file.exists() else []:
            found = re.match(r"deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
            if found and found[2] == codename:
                return found[1]
    raise RuntimeError(f"no apt source for {codename} on this host")


def _os_release(key: str) -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        name, _, value = line.partition("=")
        if name == key:
            return value.strip('"')
    raise RuntimeError(f"/etc/os-release has no {key}")


def debian_image(layout: Path) -> Image:
    image = write_layout(layout, [debian_layer()], gzip_layers=False)
    for path in [layout, *layout.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return image
