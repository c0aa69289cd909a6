"""The import budget of the hot commands (issue 13): `start NAME --agent PKG
--foreground --rm`, `status`, `stop` and `logs --tail 1` import nothing they
do not use. Each runs for real (a real sandbox under crun and runc) and the
modules it had loaded when it exited are held to a budget:

- outside the standard library, only the packages listed for the command
  (none: an audit record is signed through libcrypto, not cryptography; no
  click: their plain forms are parsed without it, tappass_host.cli.plain);
- of the standard library, none of the heavy modules below (network
  clients, asyncio, email, importlib.metadata and .resources, zipfile,
  socket, ...), nor what the command has no use for (subprocess for
  `status`, ...);
- of tappass_host, none of the control-plane, daemon, devplane, egress
  proxy or keyring-verification modules, and no jsonschema-backed schema
  check once its verdict is cached;
- a start that reuses the bundle an earlier start of the same inputs
  prepared (tappass_host.oci.bundle_cache) imports nothing that renders or
  checks a config: no layer, applier, render, invariant or schema module.
"""

import json
import subprocess
import sys

from tappass_host.processes import wait_ended
from tappass_host.runtime.start import exit_command

import patience
from audit_records import read_audit
from sandbox_fixture import (  # noqa: F401  (host and runtime are fixtures)
    _MODULES_AT_EXIT, PYTHON, host, runtime, unique_name, write_agent)

# The audit record's signature is libcrypto's, by ctypes (tappass_host.libcrypto): no
# cryptography. `stop` records the agent's exit itself (sandbox.exited and
# sandbox.stopped, one signed append) rather than wait for conmon's exit hook, a whole
# interpreter, to do it.
THIRD_PARTY = {"start": set(), "start_reused": set(), "stop": set(), "_exited": set(),
               "status": set(), "logs": set()}
HEAVY_STDLIB = {
    "asyncio", "ssl", "http", "email", "xml", "sqlite3", "concurrent", "multiprocessing",
    "logging", "urllib.request", "importlib.metadata", "importlib.resources", "zipfile", "csv",
    "decimal", "argparse", "unittest", "pydoc", "pickle", "socket", "tempfile", "random",
}
# What each command does not use at all, on top of HEAVY_STDLIB. `typing` (15M
# instructions, a tenth of `status`), `signal` (its enums) and `importlib` (click's
# lazy group) are kept off the reading commands' path (issue 13).
LEAN = {"typing", "signal", "importlib", "subprocess", "ctypes", "tomllib"}
UNUSED_STDLIB = {
    "start": set(),
    # a start of the same inputs as one before: the agent's manifest and the config file
    # parsed before (tappass_host.toml_document), no tomllib, and with it no typing
    "start_reused": {"tomllib", "typing", "contextlib", "threading"},
    # its run's state.json names the runtime: the config (tomllib) is not read; the
    # runtime's kill and delete are spawned (posix_spawn), not run by subprocess; no
    # shutil.which. It signs the exit's audit record (hashlib, base64, datetime, and
    # cryptography's typing) and unmounts the workspace (ctypes: libc's umount2), as the
    # exit hook does, whichever of the two comes first.
    "stop": {"tomllib", "subprocess", "shutil", "contextlib", "typing", "threading"},
    "status": LEAN | {"contextlib"},  # it reads; statefile and keyring.store lock for writers
    "logs": LEAN | {"shutil", "hashlib", "datetime", "contextlib"},
    "_exited": {"tomllib", "typing"},  # conmon's exit hook reads no config
}
OURS_NEVER = ("tappass_host.daemon", "tappass_host.devplane", "tappass_host.identity",
              "tappass_host.controlplane", "tappass_host.sync.transport",
              "tappass_host.sync.sse", "tappass_host.sync.receive", "tappass_host.network.proxy",
              "tappass_host.network.service", "tappass_host.keyring.verify",
              "tappass_host.keyring.envelope", "tappass_host.oci.schema",
              "tappass_host.image")
# What renders and checks a config: never loaded by a start that reuses a prepared bundle.
RENDERS = ("tappass_host.layers", "tappass_host.oci.bundle", "tappass_host.oci.render",
           "tappass_host.oci.invariants", "tappass_host.oci.schema", "jsonschema")
STDLIB = set(sys.stdlib_module_names)
# What the interpreter loads before any command (site, a venv's .pth files): not the command's.
AT_STARTUP = set(json.loads(subprocess.run(
    [PYTHON, "-c", "import json, sys; print(json.dumps(sorted(sys.modules)))"],
    check=True, capture_output=True, text=True).stdout)) - {"json", "json.decoder",
                                                            "json.scanner", "json.encoder"}


def over_budget(command: str, modules: set[str]) -> list[str]:
    """The modules of `modules` the command's budget does not allow."""
    over = []
    for module in sorted(modules - AT_STARTUP):
        top = module.split(".")[0]
        if top == "tappass_host":
            forbidden = module.startswith(OURS_NEVER)
        elif top in STDLIB or module == "__main__":
            forbidden = any(module == heavy or module.startswith(heavy + ".")
                            for heavy in HEAVY_STDLIB | UNUSED_STDLIB[command])
        else:
            forbidden = top not in THIRD_PARTY[command]
        if forbidden:
            over.append(module)
    return over


def test_the_budget_catches_what_it_forbids():
    assert over_budget("status", {"json", "tappass_host.cli"}) == []
    assert over_budget("status", {"click.core"}) == ["click.core"]
    assert over_budget("_exited", {"cryptography.hazmat", "click"}) == [
        "click", "cryptography.hazmat"]
    assert over_budget("status", {"cryptography.hazmat"}) == ["cryptography.hazmat"]
    assert over_budget("logs", {"subprocess", "datetime"}) == ["datetime", "subprocess"]
    assert over_budget("status", {"datetime", "typing", "signal"}) == ["signal", "typing"]
    assert over_budget("start", {"subprocess", "zipfile"}) == ["zipfile"]
    assert over_budget("stop", {"cryptography.hazmat", "click", "subprocess", "select"}) == [
        "click", "cryptography.hazmat", "subprocess"]
    assert over_budget("start", {"httpx", "jsonschema", "pyroute2", "importlib.metadata",
                                 "tappass_host.oci.schema", "cryptography"}) == [
        "cryptography", "httpx", "importlib.metadata", "jsonschema", "pyroute2",
        "tappass_host.oci.schema"]


def renders(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == r or m.startswith(r + ".") for r in RENDERS))


def test_start_foreground_stays_in_its_import_budget(host, runtime):
    name = host.enroll(unique_name("budget", runtime))
    agent = write_agent(host.root / "agent", ["/bin/true"])
    args = ("start", name, "--agent", str(agent), "--runtime", runtime, "--foreground", "--rm")
    host.started.append(name)
    assert "jsonschema" in host.modules_loaded(*args)  # the first start checks the schema
    reused = host.modules_loaded(*args)                # the second reuses what it prepared
    assert {"tappass_host.runtime.start", "tappass_host.audit",
            "tappass_host.oci.bundle_cache"} <= reused  # it really ran
    assert over_budget("start_reused", reused) == []
    assert renders(reused) == []
    # dataclasses (with inspect, ast, dis, tokenize) was a tenth of a reused start;
    # subprocess (for `mount -o loop`, now tappass_host.loopdev) and shutil (bz2, lzma,
    # for --rm's rmtree, now statefile.remove_tree) another
    assert not {"dataclasses", "inspect", "subprocess", "shutil"} & reused, \
        {"dataclasses", "inspect", "subprocess", "shutil"} & reused
    host.configure("max_sandboxes = 7\n")  # another input, the same config.json
    rendered = host.modules_loaded(*args)  # renders again, its schema verdict cached
    assert "tappass_host.oci.invariants" in rendered
    assert over_budget("start", rendered) == []
    again = host.modules_loaded(*args)  # that config file's parse was kept
    assert over_budget("start_reused", again) == []
    assert [e["details"]["config_reused"] for e in read_audit(
        host.paths.audit_log, name, "sandbox.started")] == [False, True, False, True]


def test_the_render_budget_catches_what_it_forbids():
    assert renders({"tappass_host.oci.bundle_cache", "tappass_host.oci.rootfs",
                    "tappass_host.landlock"}) == []
    assert renders({"tappass_host.layers", "tappass_host.layers.kernel", "jsonschema.validators",
                    "tappass_host.oci.bundle"}) == [
        "jsonschema.validators", "tappass_host.layers", "tappass_host.layers.kernel",
        "tappass_host.oci.bundle"]


def test_status_logs_and_stop_stay_in_their_import_budget(host, runtime):
    name = host.enroll(unique_name("budget", runtime))
    agent = write_agent(host.root / "agent", [
        "/bin/sh", "-c", "trap 'exit 0' TERM; echo ready; sleep 1000 & wait"])
    assert host.start(name, agent, runtime).returncode == 0
    host.wait_log(name, "ready")
    for command, args in (("status", ("status",)), ("status", ("status", name)),
                          ("status", ("--json", "status", name)),
                          ("logs", ("logs", name, "--tail", "1"))):
        modules = host.modules_loaded(*args)
        assert "tappass_host.cli.lifecycle" in modules  # the measurement is real
        assert over_budget(command, modules) == [], args
    host.configure("max_sandboxes = 8\n")  # a config to parse, for a command that reads it
    modules = host.modules_loaded("stop", name, "--timeout", "10")
    assert host.exit_record(name)["code"] == 0  # it really stopped the agent
    assert over_budget("stop", modules) == []
    # and it is recorded, signed (by stop, with the exit: one append)
    assert [(e["event"], e["details"].get("by")) for e in read_audit(host.paths.audit_log, name)
            if e["event"] in ("sandbox.exited", "sandbox.stopped")][-2:] == [
        ("sandbox.exited", None), ("sandbox.stopped", "operator")]
    assert host.run("audit", "verify").returncode == 0
    # conmon's exit hook, run as conmon runs it (start.exit_command), on the exit just recorded
    hook = exit_command(host.paths, name)
    assert hook[1:3] == ["-m", "tappass_host"] and hook[3:] == [
        "--state-dir", str(host.state), "_exited", name]
    conmon = json.loads(host.paths.sandbox(name).run_state.read_text())["conmon_pid"]
    assert wait_ended(conmon, "conmon", patience.seconds(30))  # the real hook, after stop, is done
    host.paths.sandbox(name).exit_record.unlink()
    result = subprocess.run([hook[0], "-c", _MODULES_AT_EXIT, *hook[3:]], capture_output=True,
                            text=True, timeout=patience.seconds(60), stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert host.exit_record(name)["code"] == 0  # it really recorded the exit
    line = next(line for line in result.stderr.splitlines() if line.startswith("MODULES "))
    modules = set(json.loads(line[len("MODULES "):]))
    assert {"tappass_host.cli.lifecycle", "tappass_host.audit"} <= modules
    assert over_budget("_exited", modules) == []
