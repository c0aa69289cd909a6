"""`start`, `stop`, `status`, `logs` and conmon's `_exited` hook: the hot
commands, declared once (COMMANDS) for both the click commands
(tappass_host.cli.sandbox) and the plain parser that reads their common forms
without click (tappass_host.cli); thin clients over the state on disk
(tappass_host.runtime)."""

import json
import os
import re
import sys
import time

from tappass_host.cli.plain import Command, Option, echo


def start(host, name, agent_spec, foreground, remove, runtime, image):
    """Start NAME's agent in a locked-down sandbox under its current keyring."""
    from tappass_host.runtime import start as starting
    from tappass_host.runtime.runstate import LifecycleError
    from tappass_host.sync.start_keyring import keyring_for_start

    host.paths.sandbox(name)
    # Checked here, not by click, so that a bad value is one line, like every error.
    if runtime is not None and runtime not in ("crun", "runc"):
        raise LifecycleError(f"unknown runtime {runtime!r}: use crun or runc")
    if remove and not foreground:
        raise LifecycleError("--rm needs --foreground (a detached sandbox keeps its "
                             "state until the next start or stop)")
    if agent_spec is None:  # e.g. tappass-host@.service: the last start's agent and runtime
        from tappass_host import sandbox_record

        record = sandbox_record.load(host.paths, name)
        if not record.agent:
            raise LifecycleError(f"sandbox {name!r} has never been started: "
                                 "give its agent with --agent PKG")
        agent_spec, runtime = record.agent, runtime or record.runtime
        image = image or record.extra.get("image")  # its digest: re-admitted by the keyring
    keyring = keyring_for_start(host.paths, name, host.config)
    started = starting.start(host.paths, name, agent_spec, host.config, runtime,
                             foreground_run=foreground, remove=remove,
                             warn=lambda w: echo(f"tappass-host: warning: {w}", err=True),
                             keyring=keyring, image=image)
    if foreground:
        sys.exit(started.exit_code)
    host.emit({"name": name, "pid": started.pid, "runtime": started.runtime,
               "policy_version": started.policy_version},
              f"{name}: started (pid {started.pid}, {started.runtime}, "
              f"policy_version {started.policy_version})")


def stop(host, name, timeout):
    """Stop NAME's agent: SIGTERM, then SIGKILL after --timeout."""
    from tappass_host.runtime import runstate, stop as stopping

    sandbox = runstate.ensure_known(host.paths, name)
    if not runstate.is_running(sandbox):
        raise stopping.not_running(host.paths, name)
    state = runstate.read_json(runstate.state_file(sandbox)) or {}
    # the config (tomllib: 40M instructions) only for a run whose state names no runtime
    runtime = runstate.runtime_of(host.paths, state, None if state.get("runtime")
                                  else host.config["runtime"])
    exit_record = stopping.stop(host.paths, name, runtime, timeout)
    host.emit({"name": name, "exit": exit_record},
              f"{name}: stopped (exit code {exit_record.get('code')})")


def _status_line(s: dict) -> str:
    detail = {"running": lambda: f"pid {s['pid']}, up {s['uptime_s']}s",
              "exited": lambda: f"code {(s['exit'] or {}).get('code')}"
                                + (", OOM-killed" if (s['exit'] or {}).get("oom") else ""),
              "created": lambda: "never started"}[s["state"]]()
    flags = f" [{','.join(s['flags'])}]" if s["flags"] else ""
    image = f"  image {s['image'][7:19]}" if s.get("image") else ""
    return (f"{s['name']:<20} {s['state']:<8} keyring v{s['keyring_version']}  "
            f"{detail}{image}{flags}")



def status(host, name):
    """Show the state of one sandbox, or of all."""
    from tappass_host.runtime.status import status as status_of

    names = [name] if name else host.paths.sandbox_names()
    rows = [status_of(host.paths, n) for n in names]
    if host.json:
        host.emit(rows[0] if name else rows)
    elif not rows:
        echo("no sandboxes")
    else:
        echo("\n".join(_status_line(r) for r in rows))



def logs(host, name, follow, tail, raw):
    """Print the agent's stdout/stderr (conmon's k8s-file log).

    Control characters the agent printed (escape sequences, carriage returns)
    are shown as \\xNN unless --raw; --json prints a JSON array (with -f, one
    JSON string per line)."""
    from tappass_host.runtime.runstate import ensure_known

    path = ensure_known(host.paths, name).agent_log
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        data = b""
    lines, partial = _k8s_messages(data)
    if partial and not follow:
        lines.append(partial)  # a line still being written
    lines = lines[-tail:] if tail else lines
    if host.json and not follow:
        host.emit(lines)
        return
    for line in lines:
        _show_line(host, line, raw)
    if not follow:
        return
    position = len(data)
    pending = b""
    while True:
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size < position:
                    position = 0  # conmon rotated (truncated) the log
                f.seek(position)
                chunk = f.read()
        except FileNotFoundError:
            chunk = b""
        if chunk:
            position += len(chunk)
            pending += chunk
            cut = pending.rfind(b"\n") + 1
            lines, partial = _k8s_messages(pending[:cut], partial)
            pending = pending[cut:]
            for line in lines:
                _show_line(host, line, raw)
        else:
            time.sleep(0.2)


# C0 but tab, DEL, C1, and the bytes that are not UTF-8 (decoded as surrogates);
# compiled by `re` on first use (its cache), not by every start and stop
_CONTROLS = "[\x00-\x08\x0b-\x1f\x7f-\x9f\udc80-\udcff]"


def printable(text: str) -> str:
    """`text` with every terminal control character shown as \\xNN."""
    return re.sub(_CONTROLS, lambda m: f"\\x{ord(m.group()) & 0xff:02x}", text)


def _show_line(host, line: str, raw: bool) -> None:
    if host.json:
        echo(json.dumps(line))
    elif raw:
        sys.stdout.buffer.write(line.encode("utf-8", "surrogateescape") + b"\n")
        sys.stdout.buffer.flush()
    else:
        echo(printable(line))


def _k8s_messages(data: bytes, partial: str = "") -> tuple[list[str], str]:
    """conmon's k8s-file lines `<ts> <stream> <P|F> <message>` -> whole messages:
    a long line comes as P (partial) chunks ended by an F (full) one. Bytes that
    are not UTF-8 are kept as surrogates (see `printable`, `--raw`)."""
    messages = []
    raws = data.decode(errors="surrogateescape").split("\n")
    if raws[-1] == "":
        raws.pop()
    for raw in raws:
        parts = raw.split(" ", 3)
        if len(parts) < 3 or parts[2] not in ("P", "F"):
            messages.append(partial + raw)  # not k8s-file: shown as is
            partial = ""
            continue
        text = parts[3] if len(parts) == 4 else ""
        if parts[2] == "P":
            partial += text
        else:
            messages.append(partial + text)
            partial = ""
    return messages, partial



def exited(host, name):
    """conmon's exit hook: record the agent's exit."""
    from tappass_host.runtime.stop import exit_hook

    exit_hook(host.paths, name)


COMMANDS = {command.name: command for command in (
    Command("start", start, (("name", True),), (
        Option(("--agent",), "agent_spec", metavar="PKG",
               help="Agent package: the path of a directory with tappass-agent.toml "
                    "(with a '/': ./my-agent), or the name of an installed distribution with a "
                    "'tappass.agents' entry point. Default: the agent "
                    "(and runtime) of NAME's last start."),
        Option(("--foreground",), "foreground", kind=None,
               help="Run attached; exit with the agent's code."),
        Option(("--rm",), "remove", kind=None,
               help="With --foreground: remove runtime state after."),
        Option(("--runtime",), "runtime", metavar="crun|runc",
               help="OCI runtime (default: config 'runtime', crun)."),
        Option(("--image",), "image", metavar="REF",
               help="Run the agent from this image (oci:DIR[:TAG], oci-archive:FILE[:TAG], "
                    "docker-archive:FILE, sha256:<digest> in the store), imported if needed; "
                    "NAME's keyring must allow it. Default: the package's [rootfs] image."))),
    Command("stop", stop, (("name", True),), (
        Option(("--timeout",), "timeout", kind=float, default=10.0, show_default=True,
               metavar="S", help="Seconds between SIGTERM and SIGKILL."),)),
    Command("status", status, (("name", False),)),
    Command("logs", logs, (("name", True),), (
        Option(("-f", "--follow"), "follow", kind=None, help="Keep printing new lines."),
        Option(("--tail",), "tail", kind=int, metavar="N", help="Only the last N lines."),
        Option(("--raw",), "raw", kind=None,
               help="Pass the agent's bytes through, terminal control sequences included."))),
    Command("_exited", exited, (("name", True),), hidden=True),
)}
