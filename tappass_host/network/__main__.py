"""`python -m tappass_host.network`: the egress service (spawned by `start`)."""

import argparse
from pathlib import Path

from tappass_host.network.service import Settings, main
from tappass_host.paths import HostPaths

parser = argparse.ArgumentParser(prog="tappass-host-egress")
parser.add_argument("--state", required=True)
parser.add_argument("--runtime", required=True)
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--pool", required=True)
parser.add_argument("--hosts-file", default="")
parser.add_argument("--header-timeout", type=float, default=10.0)
args = parser.parse_args()
main(HostPaths(state=Path(args.state), runtime=Path(args.runtime)),
     Settings(port=args.port, pool=args.pool, hosts_file=args.hosts_file,
              header_timeout=args.header_timeout))
