"""The harness applier: the agent framework's permission file, rendered into
the keyring version directory so that it flips with keyring.json.

Keyrings go through the real update path (verify → render → flip → audit).
The pair test runs a reader in another process over many flips: reading
keyring.json and harness/… through one resolved `..data` (a directory fd)
never gives a mismatched pair; two opens through the two top-level symlinks
can (shown deterministically, between two reads).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandbox_fixture import (  # noqa: F401  (host is a fixture)
    RUNTIMES,
    host,
    require_runtime,
    unique_name,
    write_agent,
)
from tappass_host.layers import harness

DATA = Path(__file__).resolve().parent / "data" / "harness"
CLAUDE = json.loads((DATA / "keyring-harness.json").read_text())
SETTINGS = "harness/claude-code/settings.json"


def tagged(version: int) -> dict:
    """A claude-code harness whose content names `version`: a pair is consistent
    when the settings' tag equals keyring.json's policy_version."""
    return {"runtime": "claude-code",
            "permissions": {"allow": [f"Read(/workspace/v{version}/**)"], "deny": []}}


def test_settings_json_matches_the_expected_file(host):
    name = host.enroll(unique_name("harness"), harness=CLAUDE)
    keyring = host.paths.sandbox(name).keyring
    expected = (DATA / "claude-code" / "settings.json").read_bytes()
    assert (keyring / SETTINGS).read_bytes() == expected
    assert (keyring / "..data" / SETTINGS).read_bytes() == expected
    assert os.listdir(keyring / "harness") == ["claude-code"]
    # Same keyring → same bytes, whatever the key order of the aspect.
    reordered = {"permissions": dict(reversed(CLAUDE["permissions"].items())),
                 "runtime": "claude-code"}
    assert harness.render({"harness": reordered}) == ({"claude-code/settings.json": expected}, ())
    assert harness.render({"harness": CLAUDE}) == harness.render({"harness": CLAUDE})
    # Files are the agent's to read, not to write.
    assert oct((keyring / SETTINGS).stat().st_mode & 0o777) == "0o440"


def test_an_unknown_runtime_renders_a_generic_file_and_a_warning(host):
    aspect = {"runtime": "crewai", "permissions": {"allow": ["search"], "deny": ["shell"]}}
    files, warnings = harness.render({"harness": aspect})
    assert list(files) == ["crewai/permissions.json"]
    assert json.loads(files["crewai/permissions.json"]) == {
        "runtime": "crewai", "permissions": {"allow": ["search"], "deny": ["shell"]}}
    assert len(warnings) == 1 and "'crewai' is unknown" in warnings[0]
    name = host.enroll(unique_name("generic"), harness=aspect)
    keyring = host.paths.sandbox(name).keyring
    assert (keyring / "harness" / "crewai" / "permissions.json").read_bytes() == \
        files["crewai/permissions.json"]
    # Without a runtime id: generic, and nothing to warn about.
    assert harness.render({"harness": {"permissions": {"allow": ["x"]}}})[1] == ()
    assert harness.render({"secrets": {}}) == ({}, ())


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_start_warns_about_an_unknown_harness_runtime(runtime, host, tmp_path):
    require_runtime(runtime)
    name = host.enroll(unique_name("hwarn", runtime), harness={"runtime": "crewai"})
    agent = write_agent(tmp_path / "agent", ["/bin/cat", "/run/tappass/keyring/harness/crewai/"
                                             "permissions.json"])
    started = host.start(name, agent, runtime, "--foreground", "--rm")
    assert started.returncode == 0, started.stderr
    assert "warning: harness runtime 'crewai' is unknown" in started.stderr
    assert json.loads(started.stdout)["runtime"] == "crewai"  # the agent read it inside


def test_a_policy_change_flips_settings_with_the_keyring(host):
    name = host.enroll(unique_name("hflip"), harness=CLAUDE)
    keyring = host.paths.sandbox(name).keyring
    before = (keyring / SETTINGS).read_bytes()
    host.apply(name, harness=tagged(2))
    after = json.loads((keyring / SETTINGS).read_text())
    assert after["permissions"]["allow"] == ["Read(/workspace/v2/**)"] and before != after
    assert json.loads((keyring / "keyring.json").read_text())["policy_version"] == 2
    host.apply(name)  # a keyring without a harness aspect: no stale settings stay visible
    assert not (keyring / SETTINGS).exists() and os.listdir(keyring / "harness") == []


PAIR_READER = r"""
import json, os, sys, time

def read_pair(keyring_dir):
    # Resolve ..data once (a directory fd), then read both files from that
    # one version directory. A version removed meanwhile: try again.
    while True:
        fd = os.open(os.path.join(keyring_dir, "..data"), os.O_RDONLY | os.O_DIRECTORY)
        try:
            with open("keyring.json", "rb", opener=lambda p, f: os.open(p, f, dir_fd=fd)) as k:
                version = json.load(k)["policy_version"]
            with open("harness/claude-code/settings.json", "rb",
                      opener=lambda p, f: os.open(p, f, dir_fd=fd)) as s:
                tag = json.load(s)["permissions"]["allow"][0]
            return version, tag
        except FileNotFoundError:
            continue
        finally:
            os.close(fd)

keyring_dir, stop = sys.argv[1], sys.argv[2]
seen, mismatched, reads = set(), [], 0
while not os.path.exists(stop):
    version, tag = read_pair(keyring_dir)
    reads += 1
    seen.add(version)
    if tag != f"Read(/workspace/v{version}/**)":
        mismatched.append([version, tag])
print(json.dumps({"reads": reads, "versions": sorted(seen), "mismatched": mismatched[:10]}))
"""


def test_a_reader_of_the_pair_never_sees_a_mismatch_during_flips(host, tmp_path):
    name = host.enroll(unique_name("hpair"), harness=tagged(1))
    keyring = host.paths.sandbox(name).keyring
    stop = tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, "-c", PAIR_READER, str(keyring), str(stop)],
                              stdout=subprocess.PIPE, text=True)
    try:
        flips = 150
        for version in range(2, flips + 2):
            host.apply(name, version, harness=tagged(version))
            time.sleep(0.001)  # let the reader in between flips on a loaded machine
    finally:
        stop.touch()
        out, _ = reader.communicate(timeout=30)
    result = json.loads(out)
    assert result["mismatched"] == [], result
    # It really raced the flips: it saw many versions, not one before and one after.
    assert len(result["versions"]) >= 20, result


def test_two_opens_through_the_symlinks_can_straddle_a_flip(host):
    """Why agents must read pairs through one resolved ..data: the naive way
    (one open per top-level symlink) pairs v1's keyring with v2's settings."""
    name = host.enroll(unique_name("hnaive"), harness=tagged(1))
    keyring = host.paths.sandbox(name).keyring
    naive_version = json.loads((keyring / "keyring.json").read_text())["policy_version"]
    fd = os.open(keyring / "..data", os.O_RDONLY | os.O_DIRECTORY)
    try:
        host.apply(name, 2, harness=tagged(2))  # the flip lands between the two reads
        naive_tag = json.loads((keyring / SETTINGS).read_text())["permissions"]["allow"][0]
        with open(SETTINGS, opener=lambda p, f: os.open(p, f, dir_fd=fd)) as pinned:
            pinned_tag = json.load(pinned)["permissions"]["allow"][0]
    finally:
        os.close(fd)
    assert (naive_version, naive_tag) == (1, "Read(/workspace/v2/**)")  # mismatched
    assert pinned_tag == "Read(/workspace/v1/**)"  # the pinned version stays whole
