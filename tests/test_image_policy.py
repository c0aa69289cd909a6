"""The keyring's `image` aspect (tappass_host/keyring/image_policy.py): which
image digests a sandbox may run, and how verify checks the aspect."""

from datetime import datetime, timezone

import pytest

from keyrings import policy, sign
from tappass_host.keyring.image_policy import allowed, repository_of
from tappass_host.keyring.verify import KeyringRejected, Trust, verify

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64


def test_a_keyring_without_the_aspect_allows_no_image():
    verdict = allowed(policy(1), A)
    assert not verdict and "no image aspect" in verdict.reason


def test_allowed_digests_decide_by_digest_alone():
    payload = policy(1, image={"allowed_digests": [A]})
    assert allowed(payload, A)
    assert allowed(payload, A, "any/name:tag")
    denied = allowed(payload, B)
    assert not denied and B in denied.reason


def test_allowed_repositories_pin_digests_per_name():
    payload = policy(1, image={"allowed": [{"repository": "tappass/hello-agent",
                                            "digests": [A]}]})
    assert allowed(payload, A, "tappass/hello-agent:1")
    assert allowed(payload, A, "tappass/hello-agent@" + A)
    assert not allowed(payload, A, "tappass/other:1")
    assert not allowed(payload, A)  # a pin by name needs the name
    assert not allowed(payload, B, "tappass/hello-agent:1")


def test_a_verdict_is_falsy_when_denied_even_with_a_reason():
    denied = allowed(policy(1, image={"allowed_digests": []}), A)
    assert denied.reason and not denied and bool(denied) is False


@pytest.mark.parametrize("name, repository", [
    ("busybox:1", "busybox"), ("localhost:5000/a/b:2", "localhost:5000/a/b"),
    ("localhost:5000/a/b", "localhost:5000/a/b"), ("a/b@" + A, "a/b"), ("a", "a")])
def test_repository_of_drops_the_tag_only(name, repository):
    assert repository_of(name) == repository


def _verify(payload, signer, sandbox):
    trust = Trust.from_record(sandbox)
    return verify(sign(payload, signer), trust, None, datetime.now(timezone.utc))


def test_verify_accepts_the_aspect_and_keyrings_without_it(signer, sandbox):
    assert _verify(policy(1), signer, sandbox).payload.get("image") is None
    image = {"allowed_digests": [A], "allowed": [{"repository": "tappass/x", "digests": [B]}]}
    assert _verify(policy(1, image=image), signer, sandbox).payload["image"] == image


@pytest.mark.parametrize("image, reason, where", [
    ({"allowed_digests": ["sha256:ABC"]}, "invalid", "image.allowed_digests[0]"),
    ({"allowed_digests": ["sha512:" + "a" * 128]}, "invalid", "image.allowed_digests[0]"),
    ({"allowed": [{"repository": "x:latest", "digests": [A]}]}, "invalid",
     "image.allowed[0].repository"),
    ({"allowed": [{"repository": "x", "digests": ["a" * 64]}]}, "invalid",
     "image.allowed[0].digests[0]"),
    ({"allowed": [{"repository": "x"}]}, "schema", "image/allowed/0"),
    ({"allowed_digest": [A]}, "schema", "image"),
    ({"allowed_digests": A}, "schema", "image/allowed_digests"),
])
def test_verify_rejects_a_bad_aspect_with_its_reason(signer, sandbox, image, reason, where):
    with pytest.raises(KeyringRejected) as caught:
        _verify(policy(1, image=image), signer, sandbox)
    assert caught.value.reason == reason and where in str(caught.value)
