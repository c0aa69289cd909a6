"""Running sandboxes: the OCI runtime (crun or runc) and conmon, the monitor."""

CONTAINER_PREFIX = "tappass-"


def container_id(name: str) -> str:
    return CONTAINER_PREFIX + name
