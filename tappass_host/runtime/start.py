"""`start`: a sandbox's agent under its current keyring, in a bundle the
layers render, run by crun or runc under conmon (or attached, in the
foreground). What it leaves is plain state on disk (runtime.runstate), so
the CLI is a thin client and no process of ours stays behind per sandbox.
"""

import os
import signal as signals
import sys
from collections import namedtuple

from tappass_host import clock
from tappass_host.paths import HostPaths, SandboxPaths
from tappass_host.processes import process_alive, wait_ended
from tappass_host.runtime import container_id, runintent
from tappass_host.runtime.runstate import (
    LifecycleError, ensure_known, host_lock, is_running, monitor_files, read_json,
    restart_aspects, running_names, state_file, write_exit, write_state)
from tappass_host.runtime.stop import Release, detach_network, release


def exit_command(paths: HostPaths, name: str) -> list[str]:
    return [sys.executable, "-m", "tappass_host", "--state-dir", str(paths.state),
            "_exited", name]


def await_last_monitor(sandbox: SandboxPaths, timeout: float = 10) -> None:
    """Wait for the conmon of the sandbox's last run, whose agent has ended,
    to end too: it ends after its exit hook, which releases what the run held
    (network, workspace, image root) and which `stop` does not wait out
    (runtime.stop.stop). A new run begun under the old hook could lose them.
    Not under the host lock, which the hook takes to release them."""
    state = read_json(state_file(sandbox)) or {}
    conmon = state.get("conmon_pid")
    if (not state.get("foreground") and not process_alive(state.get("pid"))
            and _monitors(conmon, state.get("cid"))):
        wait_ended(conmon, "conmon", timeout)


def _monitors(pid: int | None, cid: str | None) -> bool:
    """Whether `pid` runs with container `cid` among its arguments (conmon's
    -c): not a process that has taken the number since, another sandbox's
    conmon say."""
    try:
        with open(f"/proc/{int(pid)}/cmdline", "rb") as f:
            return bool(cid) and cid.encode() in f.read().split(b"\0")
    except (OSError, TypeError, ValueError):
        return False


def _refuse_expired(name: str, keyring: dict) -> None:
    from tappass_host.keyring.store import expired

    if expired(keyring, clock.now()):
        raise LifecycleError(
            f"sandbox {name!r}'s keyring (policy_version {keyring.get('policy_version')}) expired at "
            f"{keyring.get('expires_at')}: run 'tappass-host daemon' or 'sync apply' a fresh one")


class Started(namedtuple("Started", "name pid runtime policy_version warnings exit_code",
                         defaults=(None,))):
    # name: str, pid: int, runtime: str, policy_version: int, warnings: tuple[str, ...],
    # exit_code: int | None (foreground only). collections', not typing's: typing is
    # 12M instructions of a start (issue 13; as tappass_host.keyring)
    __slots__ = ()


def start(paths: HostPaths, name: str, agent_spec: str, config, runtime_name: str | None = None,
          foreground_run: bool = False, remove: bool = False, warn=None, *,
          keyring: dict, image: str | None = None) -> Started:
    """Start `name`'s agent under `keyring`, the payload its caller read
    (tappass_host.sync.start_keyring), refused if expired. `warn` gets each
    warning of the layers as soon as the sandbox is up (before a foreground
    agent runs, not after it ends). `image`: an image source to run the agent
    from (over its package's [rootfs]), which `keyring` must allow."""
    from tappass_host import agent, ids, workspace
    from tappass_host import sandbox_record
    from tappass_host.keyring.store import store_for
    from tappass_host.oci import bundle_cache
    from tappass_host.paths import is_rootless
    from tappass_host.runtime import monitor

    sandbox = ensure_known(paths, name)
    manifest = agent.load(agent_spec, paths)
    if not image:  # from an image: checked in its root (_admit_image)
        agent.check_entrypoint(manifest)
    runtime = find_runtime(paths, config, runtime_name)
    conmon = None if foreground_run else monitor.find_conmon(config["conmon_path"])
    _refuse_expired(name, keyring)
    admitted = None
    if image or manifest.rootfs == "image":
        manifest, admitted = _admit_image(paths, config, name, manifest, image, keyring)
    rootless = is_rootless()
    cid = container_id(name)
    await_last_monitor(sandbox)
    with host_lock(paths):
        if is_running(sandbox):
            raise LifecycleError(f"sandbox {name!r} is already running")
        running = running_names(paths)
        if len(running) >= config["max_sandboxes"]:
            raise LifecycleError(
                f"{len(running)} sandboxes are running, the limit (max_sandboxes) is "
                f"{config['max_sandboxes']}: stop one first")
        # Under the lock, once the sandbox is known not to run: the ids may move
        # (ids._given_up), which a running agent's keyring and workspace must not see.
        agent_ids = ids.agent_ids(paths, name, config.agent_id_range)
        ids.check_runtime(agent_ids, runtime.name)
        record = sandbox_record.load(paths, name)
        if not rootless:  # rootless: the agent's host id is a mapped one; the runtime decides
            agent.check_readable(manifest, agent_ids.uid, agent_ids.gid)
        store = store_for(paths, record)
        with store.transaction():
            store.adopt_group()
        workspace_warnings = workspace.attach(
            sandbox, config["filesystem.workspace_mb"], agent_ids.owner_uid,
            agent_ids.owner_gid, rootless)
        try:
            if admitted:
                _mount_image(sandbox, admitted)
            host = bundle_cache.host_facts(agent_ids, rootless, runtime.name,
                                           _egress_proxy(paths, name, keyring, config, rootless))
            key = bundle_cache.key(paths, name, record, keyring, manifest, config, host,
                                   admitted.digest if admitted else None)
            prepared = bundle_cache.reuse(paths, name, record, keyring, key)
            reused = prepared is not None
            if not reused:  # the full path: appliers, render, invariants, schema
                prepared = _build(paths, name, record, keyring, manifest, config, host, rootless)
                bundle_cache.keep(paths, key, prepared)
        except BaseException:
            _unmount_image(sandbox)
            detach_network(paths, name)
            workspace.release(sandbox)
            raise
        warnings = prepared.warnings + workspace_warnings
        if agent_ids.moved:
            warnings += (f"sandbox {name!r}'s {agent_ids.moved}: its agent runs as "
                         f"{agent_ids.uid}:{agent_ids.gid} from now on, and its workspace's "
                         "files were given to those ids",)
        if runtime.has_state(cid):
            runtime.delete(cid)  # a stopped container of an earlier run
        digest = admitted.digest if admitted else None
        if (record.agent, record.runtime, record.extra.get("image")) != (
                str(manifest.directory), runtime.name, digest):
            extra = {k: v for k, v in record.extra.items() if k != "image"}
            if digest:  # what `image rm`/`prune` keep (tappass_host.image.store)
                extra["image"] = digest
            record = record._replace(agent=str(manifest.directory), runtime=runtime.name,
                                     extra=extra)
            sandbox_record.save(sandbox, record)
        state = {"runtime": runtime.name, "runtime_binary": runtime.binary, "cid": cid,
                 "started_at": clock.now_text("microseconds"), "policy_version": keyring["policy_version"],
                 "agent": str(manifest.directory), "restart_policy": manifest.restart,
                 "foreground": foreground_run,
                 "restart_aspects": restart_aspects(keyring, prepared.restart),
                 "warnings": list(warnings),
                 "degraded": bool(prepared.unavailable)}
        if admitted:  # tappass_host.sync.apply reads both after each flip
            state.update(image=admitted.digest, image_repository=admitted.repository,
                         on_image_revoked=config["on_image_revoked"])
        had_log = sandbox.agent_log.exists()
        try:
            if foreground_run:
                # Under the lock, like a monitored start: a concurrent start
                # must count this sandbox against max_sandboxes.
                write_state(sandbox, {**state, "pid": os.getpid()})
            else:
                files = monitor_files(sandbox)
                sandbox.logs.mkdir(parents=True, exist_ok=True)
                pid = monitor.launch(runtime, conmon, cid, sandbox.bundle, files,
                                     sandbox.agent_log, config["log_max_bytes"],
                                     exit_command(paths, name))
                conmon_pid = int(files.conmon_pid.read_text().strip())
                write_state(sandbox, {**state, "pid": pid, "conmon_pid": conmon_pid})
                runtime.start(cid)
        except BaseException:
            _undo_start(sandbox, runtime, cid)
            detach_network(paths, name)
            workspace.release(sandbox)
            if not had_log:
                sandbox.agent_log.unlink(missing_ok=True)  # conmon's, for nothing
            raise
    # Attached: the runtime creates the container while the audit record is written.
    creating = None
    if foreground_run:
        from tappass_host.runtime import attached

        creating = attached.begin(runtime, cid, sandbox.bundle)
    try:
        warnings = _record_start(paths, sandbox, name, state, runtime, keyring, manifest,
                                 reused, admitted, prepared, warnings, warn)
    except BaseException:
        if creating is not None:
            _end_attached(paths, name, sandbox, remove, _deleting(creating))
        raise
    if not foreground_run:
        return Started(name, pid, runtime.name, keyring["policy_version"], warnings)
    code = _run_attached(paths, name, sandbox, state, remove, creating)
    return Started(name, 0, runtime.name, keyring["policy_version"], warnings,
                   exit_code=code)


def _run_attached(paths: HostPaths, name: str, sandbox: SandboxPaths, state: dict,
                  remove: bool, creating) -> int:
    """The created container run attached until its agent exits; its exit
    recorded while the runtime deletes it; returns the exit code."""
    from tappass_host.runtime import attached

    ended = None
    try:
        ended = attached.run(creating)
    finally:
        deleting = _deleting(creating)  # its cgroup counted OOM kills until now
        releasing = Release(paths, name, ours=True)
        try:
            if ended is not None:
                write_exit(paths, name, ended.code, oom=ended.oom,
                           started_at=state["started_at"])
        finally:
            _end_attached(paths, name, sandbox, remove, deleting, releasing)
    return ended.code


def _record_start(paths: HostPaths, sandbox: SandboxPaths, name: str, state: dict, runtime,
                  keyring: dict, manifest, reused: bool, admitted, prepared, warnings,
                  warn) -> list[str]:
    """What a start leaves once its sandbox is up: the intent to run it again
    after a reboot (or none, for a foreground run, which its unit brings back),
    the audit records, the warnings shown; returns the warnings."""
    from tappass_host.audit import AuditLog

    try:
        if state["foreground"]:
            runintent.clear(sandbox)
        else:
            runintent.record(sandbox, state)
    except OSError as exc:  # it runs all the same
        warnings = [*warnings, f"not brought back after a reboot: {exc.strerror or exc}"]
    audit = AuditLog.for_host(paths)
    audit.append("sandbox.started", sandbox=name, details={
        "runtime": runtime.name, "policy_version": keyring["policy_version"],
        "agent": manifest.name, "foreground": state["foreground"], "config_reused": reused,
        **({"image": admitted.digest} if admitted else {})})
    for layer, feature in prepared.unavailable:
        audit.append("layer.unavailable", sandbox=name, details={"layer": layer, "feature": feature})
    for warning in warnings if warn else ():
        warn(warning)
    return warnings


def _deleting(creating):
    """The container's `delete` begun, once its create has ended (None: the
    runtime holds no state for it)."""
    creating.spawned.wait(None)
    runtime, cid = creating.runtime, creating.cid
    return runtime.begin_delete(cid) if runtime.has_state(cid) else None


def _end_attached(paths: HostPaths, name: str, sandbox: SandboxPaths, remove: bool,
                  deleting, releasing=None) -> None:
    """After an attached run: its network, workspace and image root released
    (by `releasing`, if begun) while the runtime deletes the container; then
    its state (which kept any other start of it out until the container was
    gone) and, with --rm, its runtime directory removed."""
    try:
        if releasing is not None:
            releasing.wait()
        else:
            release(paths, name, ours=True)
    finally:
        if deleting is not None:
            deleting.wait()
        state_file(sandbox).unlink(missing_ok=True)
        if remove:
            from tappass_host.statefile import remove_tree

            remove_tree(sandbox.runtime)


def _admit_image(paths: HostPaths, config, name: str, manifest, image: str | None,
                 keyring: dict):
    """The manifest as run from its image, and the image its keyring admitted
    (tappass_host.runtime.imageroot)."""
    from tappass_host.paths import is_rootless
    from tappass_host.runtime import imageroot

    imageroot.require_root(is_rootless())
    manifest = manifest._replace(rootfs="image", image=imageroot.source_of(manifest, image))
    admitted = imageroot.admit(paths, config, name, manifest.image, keyring)
    imageroot.check_entrypoint(manifest, admitted.lower)
    return manifest, admitted


def _mount_image(sandbox: SandboxPaths, admitted) -> None:
    from tappass_host.runtime import imageroot

    imageroot.mount(sandbox, admitted.lower)


def _unmount_image(sandbox: SandboxPaths) -> None:
    """Under the host lock already (start's failure paths)."""
    if os.path.ismount(sandbox.rootfs):
        from tappass_host.runtime import imageroot

        imageroot.unmount(sandbox)


def find_runtime(paths: HostPaths, config, name: str | None = None, binary: str = ""):
    """The OCI runtime `name` (default: config `runtime`). Config `runtime_path`
    applies to the runtime config names, whether or not `--runtime` repeats it."""
    from tappass_host.runtime.ociruntime import OCIRuntime

    name = name or config["runtime"]
    override = binary or (config["runtime_path"] if name == config["runtime"] else "")
    return OCIRuntime.find(name, paths.runtime, override)


def _build(paths: HostPaths, name: str, record, keyring: dict, manifest, config, host: dict,
           rootless: bool):
    """The bundle rendered and checked (tappass_host.oci.bundle), installed;
    its tappass_host.oci.bundle_cache.Prepared."""
    from tappass_host import layers
    from tappass_host.oci import bundle as oci_bundle

    inputs = oci_bundle.layer_inputs(paths, name, record, keyring, manifest, config,
                                     layers.Host(**host))
    return oci_bundle.build(paths, inputs, rootless)


def _egress_proxy(paths: HostPaths, name: str, keyring: dict, config, rootless: bool) -> str:
    """Network mode proxy: the sandbox's namespace and proxy listener
    (tappass_host.network); the proxy's URL, which the network layer gives the
    agent ("" in mode none). In any mode, what crashed sandboxes left of
    theirs is removed first."""
    from tappass_host.network import control

    if (keyring.get("network") or {}).get("mode") != "proxy" or rootless:
        control.reap(paths, is_running)
        return ""
    return control.attach(paths, name, config)["proxy_url"]


def _undo_start(sandbox: SandboxPaths, runtime, cid: str) -> None:
    """A start that failed half-way leaves nothing behind: no monitor, no
    container, no runtime dir."""
    import shutil

    try:
        conmon_pid = int(monitor_files(sandbox).conmon_pid.read_text().strip())
    except (OSError, ValueError):
        conmon_pid = None
    if process_alive(conmon_pid, "conmon"):
        try:
            os.kill(conmon_pid, signals.SIGKILL)
        except ProcessLookupError:
            pass
    if runtime.has_state(cid):
        runtime.delete(cid)
    _unmount_image(sandbox)
    shutil.rmtree(sandbox.runtime, ignore_errors=True)
