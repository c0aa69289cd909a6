"""Benchmark: importing an image into the local store (issue 14), per MiB.

The image is built here, no registry: the busybox-static root of
tests/image_fixture.py plus N files of incompressible bytes and a tree of
many small files, as gzip layers in an OCI layout. Each run imports it into
a fresh store (verify every blob, unpack every layer through openat2, one
syncfs) and is timed; the figures are per MiB of blobs (what is read and
hashed) and per MiB unpacked, with the import of an image already in the
store (a no-op) for comparison.

Prints one JSON object. Usage: python bench/image_import.py [--mib 64] [--runs 3]
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from image_fixture import Dir, File, busybox_entries, tar_layer, write_layout  # noqa: E402

from tappass_host.image.source import open_source  # noqa: E402
from tappass_host.image.store import ImageStore  # noqa: E402
from tappass_host.image.unpack import Limits  # noqa: E402
from tappass_host.paths import HostPaths  # noqa: E402

MiB = 1024 * 1024


def _image(where: Path, mib: int):
    big = [File(f"data/blob{i}", os.urandom(MiB), 0o644) for i in range(mib)]
    small = [File(f"tree/d{i // 100}/f{i}", os.urandom(512)) for i in range(2000)]
    dirs = [Dir("data"), Dir("tree")] + [Dir(f"tree/d{i}") for i in range(20)]
    return write_layout(where, [tar_layer(busybox_entries()), tar_layer(dirs + big),
                                tar_layer(small)])


def _import(paths: HostPaths, reference: str):
    store = ImageStore(paths, Limits(64 * 1024 * MiB, 4096 * MiB, 1_000_000))
    source = open_source(reference, paths)
    try:
        start = time.perf_counter()
        imported = store.import_image(source)
        return time.perf_counter() - start, imported
    finally:
        source.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="incompressible data in the image")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        image = _image(Path(tmp) / "layout", args.mib)
        blob_bytes = sum(p.stat().st_size for p in (image.layout / "blobs/sha256").iterdir())
        times, again = [], []
        for run in range(args.runs):
            paths = HostPaths.resolve(Path(tmp) / f"state{run}")
            seconds, imported = _import(paths, f"oci:{image.layout}")
            times.append(seconds)
            again.append(_import(paths, f"oci:{image.layout}")[0])
            unpacked = imported.record.unpacked_bytes
            shutil.rmtree(paths.state)
    median = statistics.median(times)
    print(json.dumps({
        "runs": args.runs,
        "blob_mib": round(blob_bytes / MiB, 1),
        "unpacked_mib": round(unpacked / MiB, 1),
        "files": len(busybox_entries()) + args.mib + 2000,
        "import_s_median": round(median, 3),
        "import_s_all": [round(t, 3) for t in times],
        "ms_per_blob_mib": round(1000 * median / (blob_bytes / MiB), 2),
        "ms_per_unpacked_mib": round(1000 * median / (unpacked / MiB), 2),
        "mib_per_s": round((blob_bytes / MiB) / median, 1),
        "already_in_store_ms_median": round(1000 * statistics.median(again), 2),
    }, indent=2))


if __name__ == "__main__":
    main()
