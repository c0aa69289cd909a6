"""Kernel confinement: the deny-by-default seccomp profile for this machine,
no new privileges, no capabilities, and — where the kernel has it — a
Landlock ruleset applied inside the sandbox before the agent is exec'd.
(Namespaces and masked paths come from the template; the invariants hold
whatever any layer says.)

Landlock has no OCI field, so this layer makes the agent's argv run through
a small launcher (tappass_host/sandbox_launcher/landlock_exec.py, mounted
read-only at /run/tappass/launcher) that restricts itself, then execs the
entrypoint. The launcher starts with a fixed environment; the agent's
(its package's [env] included, LD_* and locale variables alike) is applied
only at that exec, after the ruleset (tappass_host.oci.bundle).
What the agent may reach, beyond its open file descriptors:

- read and execute: the rootfs's /usr, /bin, /sbin, /lib*; /opt/agent
- read: /etc, /proc (its own pid namespace; the sensitive parts are masked
  by the invariants; runtimes read /proc/self), the keyring, and each
  `filesystem.read_only` path
- everything (read, write, create, execute where the mount allows it): the
  workspace, /tmp and /dev/shm (POSIX shared memory and semaphores: Python's
  multiprocessing needs it; its mount is noexec). Execute is not withheld
  there: an agent that runs code can run an interpreter on any file anyway.
- the devices every runtime opens: /dev/null, /dev/zero, /dev/full,
  /dev/tty, /dev/ptmx and /dev/pts (read, write), /dev/random, /dev/urandom
  (read)

Everything else visible in the sandbox (/sys, /dev/mqueue, the rest of /dev,
/run/tappass/launcher itself, the agent's environment file) is refused with
EACCES. The launcher fails closed: if it cannot apply the ruleset the agent
does not start. Without Landlock (ABI 0), `kernel_layer = "required"` fails
the start and `"best-effort"` starts unconfined by Landlock, with a warning,
the audit event `layer.unavailable` and `degraded` in status; no launcher
runs then, and the agent's environment is process.env itself (there is no
ruleset for it to get ahead of).
"""

from tappass_host import landlock, shipped
from tappass_host.layers import LayerInputs, LayerResult, LayerUnavailable
from tappass_host.layers.keyring import DESTINATION as KEYRING_DESTINATION

READ_EXEC = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/opt/agent")
READ = ("/etc", "/proc", KEYRING_DESTINATION)
READ_WRITE = ("/tmp", "/dev/shm")
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/tty", "/dev/ptmx", "/dev/pts")
READ_DEVICES = ("/dev/random", "/dev/urandom")


def rules(keyring: dict) -> list[str]:
    fs = keyring.get("filesystem", {})
    return ([f"rx={p}" for p in READ_EXEC]
            + [f"r={p}" for p in (*READ, *fs.get("read_only", []))]
            + [f"rw={p}" for p in (fs.get("workspace", "/workspace"), *READ_WRITE)]
            + [f"dev={p}" for p in DEVICES]
            + [f"rdev={p}" for p in READ_DEVICES])


def launcher_mount() -> dict:
    return {"destination": landlock.LAUNCHER_DIR, "type": "bind",
            "source": str(landlock.launcher_source()),
            "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]}


def host_usr_mount() -> dict:
    """An image's root: the host's /usr, for the launcher's python3 (landlock.HOST_USR)."""
    return {"destination": landlock.HOST_USR, "type": "bind", "source": "/usr",
            "options": ["rbind", "ro", "nosuid", "nodev"]}


def apply(inputs: LayerInputs) -> LayerResult:
    seccomp = shipped.load_json(shipped.seccomp_profile(inputs.host.machine))
    oci: dict = {"process": {"noNewPrivileges": True}, "linux": {"seccomp": seccomp}}
    missing = landlock.missing(inputs.host.landlock_abi)
    in_image = inputs.manifest.rootfs == "image"
    launch = landlock.host_launch() if in_image else landlock.LAUNCH
    if missing is None and launch is None:
        missing = f"the host's {landlock.PYTHON} or its loader is not under /usr"
    if missing is None:
        # A later layer replacing process.args would drop the launcher: the
        # invariants refuse such a config (the launcher mount says it's expected).
        oci["process"]["args"] = landlock.command(rules(inputs.keyring),
                                                  list(inputs.manifest.entrypoint), launch)
        oci["mounts"] = [launcher_mount(), *([host_usr_mount()] if in_image else [])]
        return LayerResult(oci=oci)
    if inputs.config["kernel_layer"] == "required":
        raise LayerUnavailable(f"kernel layer: {missing}; the agent would run without Landlock "
                               "(set kernel_layer = \"best-effort\" in config to allow that)")
    return LayerResult(oci=oci, unavailable=("landlock",),
                       warnings=(f"kernel layer degraded: {missing}; the agent runs without "
                                 "Landlock",))
