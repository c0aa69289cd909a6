import os
import stat

import pytest

from tappass_host import config, statefile
from tappass_host.errors import ConfigError, InvalidName
from tappass_host.paths import HostPaths, check_sandbox_name


def test_every_key_has_a_default(tmp_path):
    loaded = config.load(tmp_path / "absent.toml")
    assert loaded["runtime"] == "crun"
    assert loaded["max_sandboxes"] == 8
    assert loaded["limits.pids_max"] > 0
    assert loaded.agent_id_range == (200000, 299999)
    assert loaded.source is None


@pytest.mark.parametrize("text, named", [
    ('runtme = "crun"', "'runtme'"),
    ('[limits]\nmemroy_mb = 1', "'limits.memroy_mb'"),
    ('max_sandboxes = "8"', "'max_sandboxes' must be an integer"),
    ('runtime = "docker"', "'runtime' must be one of crun, runc"),
    ('restart_on_policy_change = 1', "must be a boolean"),
    ('agent_id_range = "5-1"', "agent_id_range"),
    ('runtime = ', "not valid TOML"),
    ('max_sandboxes = 0', "'max_sandboxes' must be at least 1"),
    ('[limits]\npids_max = -5', "'limits.pids_max' must be at least 1"),
    ('[supervision]\nbackoff_initial_s = -1', "'supervision.backoff_initial_s' must be at least"),
    ('[sync]\nkeepalive_timeout_s = 0', "'sync.keepalive_timeout_s' must be at least"),
    ('[network]\nproxy_port = 99999', "'network.proxy_port' must be between 1 and 65535"),
    ('[network]\naddress_pool = "not-a-cidr"', "'network.address_pool' must be an IPv4 network"),
    ('[network]\naddress_pool = "169.254.1.1/32"', "must be a /30 or larger"),
    ('[network]\nhosts_file = "hosts"', "'network.hosts_file' must be an absolute path"),
])
def test_bad_config_is_rejected_with_the_key(tmp_path, text, named):
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert named in str(info.value)
    assert "\n" not in str(info.value)


def test_values_override_defaults(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('runtime = "runc"\n[sync]\nbackoff_max_s = 5\n[trust]\nkeys = ["ed25519:x"]\n')
    loaded = config.load(path)
    assert loaded["runtime"] == "runc"
    assert loaded["sync.backoff_max_s"] == 5.0
    assert loaded["sync.backoff_initial_s"] == 0.5
    assert loaded["trust.keys"] == ["ed25519:x"]


def test_an_explicit_config_file_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml", required=True)


@pytest.mark.parametrize("name", ["a", "demo", "agent-1.prod_x", "0" * 63])
def test_good_sandbox_names(name):
    assert check_sandbox_name(name) == name


@pytest.mark.parametrize("name", ["", "A", "-x", ".x", "../x", "a/b", "0" * 64, "x y", "é"])
def test_bad_sandbox_names(name):
    with pytest.raises(InvalidName):
        check_sandbox_name(name)


def test_state_dir_override_keeps_runtime_beside_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TAPPASS_HOST_STATE_DIR", str(tmp_path / "s"))
    paths = HostPaths.resolve()
    assert paths.state == tmp_path / "s"
    assert paths.runtime == tmp_path / "s" / "run"
    assert paths.sandbox("x").bundle == tmp_path / "s" / "run" / "x" / "bundle"
    assert HostPaths.resolve(tmp_path / "t").state == tmp_path / "t"


def test_root_defaults(monkeypatch):
    monkeypatch.delenv("TAPPASS_HOST_STATE_DIR", raising=False)
    if os.geteuid() == 0:
        paths = HostPaths.resolve()
        assert str(paths.state) == "/var/lib/tappass-host"
        assert str(paths.runtime) == "/run/tappass-host"


def test_atomic_write_replaces_whole_file_with_its_mode(tmp_path):
    target = tmp_path / "f.json"
    statefile.write_atomic(target, b"old", 0o600)
    statefile.write_atomic(target, b"new", 0o640)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]
