"""hello-agent: the sample agent of tappass-host.

Prints the policy_version of its keyring, then a line for every change it
observes. It simply re-reads $TAPPASS_KEYRING_PATH: the path resolves through
the `..data` symlink that tappass-host flips, so every read sees one whole
version. (An agent could instead watch the directory with inotify.)
Stdlib only: it runs on the host's python3, read-only, as an unprivileged UID.
"""

import json
import os
import signal
import sys
import time

PATH = os.environ.get("TAPPASS_KEYRING_PATH", "/run/tappass/keyring/keyring.json")
INTERVAL = float(os.environ.get("TAPPASS_POLL_INTERVAL", "0.02"))


def read_version():
    try:
        with open(PATH, "rb") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None, None
    return doc.get("policy_version"), doc.get("issued_at")


def main():
    # As PID 1 of its sandbox, the agent gets no default signal handling.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    greeting = os.environ.get("GREETING", "hello")
    seen = read_version()
    print(f"{greeting} from hello-agent: policy_version={seen[0]}", flush=True)
    if len(sys.argv) > 1 and sys.argv[1] == "--once":
        return
    while True:
        time.sleep(INTERVAL)
        current = read_version()
        if current != seen and current[0] is not None:
            print(f"policy changed: policy_version={current[0]} observed_at={time.time():.6f}",
                  flush=True)
            seen = current


if __name__ == "__main__":
    main()
