"""The errors tappass-host reports to its user.

Every error the CLI prints is a `TappassError`: its message is one line that
says what is wrong, and it never carries secret material. The hierarchy, each
class with the module (under tappass_host/) that defines and raises it:

    TappassError                    errors.py
        ConfigError                 errors.py
        InvalidName                 errors.py
        NotFound                    errors.py
        AuditError                  audit.py
            AuditLogBroken          audit.py
            AuditWriteFailed        audit.py
        BadAgent                    agent.py
        BadKey                      signing.py
        BadRecord                   sandbox_record.py
        NoFreeIds                   ids.py
        RootlessUnsupported         ids.py
        UserNamespaceUnavailable    userns.py
        TooLarge                    responses.py
        WorkspaceError              workspace.py
        ImageError                  image/__init__.py
            ImageRejected           image/manifest.py   (carries `reason`)
                LayerRejected       image/unpack.py
            ImageSourceError        image/source.py
            ImageStoreError         image/store.py
            ImageDenied             runtime/imageroot.py   (carries `reason`)
            ImageRootUnavailable    runtime/imageroot.py
        IdentityError               identity/errors.py
            AlreadyEnrolled         identity/errors.py
            BadBootstrap            identity/errors.py
            BootstrapConsumed       identity/errors.py
            EnrollmentRefused       identity/errors.py
            RenewalError            identity/errors.py
            BadMachineKey           identity/certs.py
        KeyringRejected             keyring/verify.py   (carries `reason`)
            LayerFilesInvalid       sync/apply.py
        ExchangeUnsupported         keyring/store.py
        UnknownApplier              layers/__init__.py
        LayerUnavailable            layers/__init__.py
        LayerFilesRejected          layers/files.py
        InvariantViolation          oci/invariants.py
        LayerSchemaError            oci/bundle.py
        SchemaUnavailable           oci/schema.py
        BundleSchemaError           oci/schema.py
        MountPointOutsideRootfs     oci/rootfs.py
        OCIRuntimeFailed            runtime/ociruntime.py (the OCI runtime binary)
        MonitorError                runtime/monitor.py
        LifecycleError              runtime/runstate.py
            StopNotRecorded         runtime/stop.py
        EgressError                 network/control.py
        PoolExhausted               network/addresses.py
        ControlPlaneError           controlplane/errors.py   (carries `reason`)
            Unreachable             controlplane/errors.py
                Untrusted           controlplane/errors.py
            NoIdentity              controlplane/errors.py
            Refused                 controlplane/errors.py   (carries `status`)
            Stalled                 controlplane/errors.py
            AnswerTooLarge          controlplane/errors.py
            BadAnswer               controlplane/errors.py
        UnreadableURL               cli/enroll.py
        DevplaneError               devplane/state.py   (the development control plane)

Not TappassErrors, because they never reach the user as such: each is caught
by its module's caller and turned into one of the above, an HTTP answer, a
refused connection or the launcher's one-line refusal:
CertificateMismatch (identity/certs.py), EnvelopeError (keyring/envelope.py),
StrictJSONError (strictjson.py), BadDomainPattern (domains.py), Malformed
(network/client_hello.py), BadRequest and BadResponse (network/http1.py),
_Broken (audit.py), Refusal (devplane/server.py), and Refused
(sandbox_launcher/landlock_exec.py, inside the sandbox, which imports nothing of ours).
"""


class TappassError(Exception):
    """An error with a one-line, user-facing message."""

    exit_code = 1


class ConfigError(TappassError):
    """The configuration file is unreadable or holds a bad key or value."""


class InvalidName(TappassError):
    """A sandbox name does not match the allowed pattern."""


class NotFound(TappassError):
    """A sandbox or file the command needs does not exist."""


def describe(exc: BaseException) -> str:
    """One line for an error: an OSError as its message and file."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc)
