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

import patience
from sandbox_fixture import (  # noqa: F401  (host is a fixture)
    RUNTIMES,
    host,
    require_runtime,
    unique_name,
    write_agent,
)
from tappass_host.keyring import harness_rules
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
        out, _ = reader.communicate(timeout=patience.seconds(30))
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


# -- Claude Code settings: the tool-rule grammar and the public schema -----------------------

SCHEMA = Path(__file__).resolve().parent / "data" / "claude-code-settings.schema.json"
FULL = {"runtime": "claude-code", "permissions": {
    "allow": ["Bash(git status:*)", "Read(/workspace/**)", "WebFetch(domain:api.tappass.ai)",
              "mcp__github__search_repositories", "Agent(Explore)", "Glob"],
    "deny": ["Bash(curl:*)", "Read(/run/tappass/keyring/**)", "WebSearch", "mcp__puppeteer"],
    "ask": ["Bash(git push:*)", "Edit(/workspace/src/**)"],
    "defaultMode": "dontAsk",
    "additionalDirectories": ["/data/ref", "/tmp/scratch"],
    "disableBypassPermissionsMode": "disable"}}
SECRETISH = "sk-live-SECRET-4242"


def schemastore_validator():
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_rendered_settings_validate_against_the_schemastore_schema(host):
    validator = schemastore_validator()
    name = host.enroll(unique_name("hschema"), harness=FULL)
    keyring = host.paths.sandbox(name).keyring
    settings = json.loads((keyring / SETTINGS).read_text())
    assert settings == {"permissions": FULL["permissions"]}
    # The vendored extract describes every key the file sets (see its .md).
    assert set(settings) <= set(validator.schema["properties"])
    assert list(validator.iter_errors(settings)) == []
    expected = json.loads((DATA / "claude-code" / "settings.json").read_text())
    assert list(validator.iter_errors(expected)) == []
    # The judge itself refuses what the review found: these would deny nothing.
    for rule in ("bash(curl:*)", "Shell(rm)", ""):
        assert list(validator.iter_errors({"permissions": {"deny": [rule]}})), rule


BAD_RULES = [
    "bash(curl:*)", "Shell(rm)", "", "Bash()", "Bash(curl", "Bash(a)(b)", "Bash(x)\n",
    " Bash", "Bash ", "Read(/a\x1b[2J)", "mcp__", "Task", f"Bash({SECRETISH}:*)x",
]


def sync_apply(host, name, tmp_path, harness_aspect) -> subprocess.CompletedProcess:
    envelope = tmp_path / f"{time.monotonic_ns()}.dsse.json"
    envelope.write_bytes(host.envelope(name, harness=harness_aspect))
    return host.run("sync", "apply", name, str(envelope))


@pytest.mark.parametrize("rule", BAD_RULES)
def test_a_rule_claude_code_does_not_understand_rejects_the_keyring(rule, host, tmp_path):
    name = host.enroll(unique_name("hrule"), harness=CLAUDE)
    keyring = host.paths.sandbox(name).keyring
    before = (keyring / SETTINGS).read_bytes()
    rules = {"runtime": "claude-code",
             "permissions": {"allow": ["Read(/workspace/**)"], "deny": ["Bash(rm:*)", rule]}}

    result = sync_apply(host, name, tmp_path, rules)

    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "invalid" in result.stderr and "harness.permissions.deny[1]" in result.stderr
    audit = host.paths.audit_log.read_text()
    rejected = [json.loads(line) for line in audit.splitlines()][-1]
    assert rejected["event"] == "keyring.rejected" and rejected["details"]["reason"] == "invalid"
    if rule.strip():
        for text in (result.stdout, result.stderr, audit):
            assert rule not in text and SECRETISH not in text
    assert (keyring / SETTINGS).read_bytes() == before  # the last good settings stay


@pytest.mark.parametrize("permissions,where,schema_refuses", [
    ({"ask": ["Read(/a)", "Read(/a)"]}, "harness.permissions.ask[1] repeats", True),
    ({"defaultMode": "yolo"}, "harness.permissions.defaultMode", True),
    ({"defaultMode": "bypassPermissions", "disableBypassPermissionsMode": "disable"},
     "harness.permissions.defaultMode is bypassPermissions", False),  # contradictory
    ({"disableBypassPermissionsMode": "enable"}, "harness.permissions.disableBypassPermissionsMode",
     True),
    ({"additionalDirectories": ["/data", ""]}, "harness.permissions.additionalDirectories[1]", True),
    ({"additionalDirectories": ["/data\n/etc"]}, "harness.permissions.additionalDirectories[0]",
     False),  # stricter than the schema: no control characters in a path
])
def test_claude_code_permission_settings_are_checked(permissions, where, schema_refuses, host,
                                                     tmp_path):
    validator = schemastore_validator()
    name = host.enroll(unique_name("hperm"), harness=CLAUDE)
    result = sync_apply(host, name, tmp_path, {"runtime": "claude-code", "permissions": permissions})
    assert result.returncode != 0 and "invalid" in result.stderr and where in result.stderr, \
        result.stderr
    rendered = json.loads(harness.render({"harness": {"runtime": "claude-code",
                                                      "permissions": permissions}})[0][
        "claude-code/settings.json"])
    assert bool(list(validator.iter_errors(rendered))) == schema_refuses


def test_other_runtimes_keep_their_own_rule_vocabulary(host, tmp_path):
    name = host.enroll(unique_name("hother"))
    result = sync_apply(host, name, tmp_path, {"runtime": "crewai",
                                               "permissions": {"deny": ["shell", ""]}})
    assert result.returncode == 0, result.stderr


def test_every_rule_the_grammar_accepts_the_schema_accepts():
    from hypothesis import given, settings, strategies as st

    validator = schemastore_validator()

    def schema_accepts(rule: str) -> bool:
        return not list(validator.iter_errors({"permissions": {"deny": [rule]}}))

    def grammar_accepts(rule: str) -> bool:
        return not list(harness_rules.problems({"harness": {
            "runtime": "claude-code", "permissions": {"deny": [rule]}}}))

    @settings(max_examples=400, deadline=None)
    @given(st.one_of(st.from_regex(harness_rules._CLAUDE_RULE, fullmatch=True), st.text()))
    def check(rule):
        if grammar_accepts(rule):
            assert schema_accepts(rule), rule

    check()
    for rule in BAD_RULES:
        assert not grammar_accepts(rule), rule
    for rule in validator.schema["$defs"]["permissionRule"]["examples"]:
        assert grammar_accepts(rule), rule
