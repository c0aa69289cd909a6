"""Kernel confinement: the deny-by-default seccomp profile for this machine,
no new privileges, no capabilities. (Namespaces and masked paths come from
the template; the invariants hold whatever any layer says.)"""

from tappass_host import shipped
from tappass_host.layers import LayerInputs, LayerResult


def apply(inputs: LayerInputs) -> LayerResult:
    seccomp = shipped.load_json(shipped.seccomp_profile(inputs.host.machine))
    return LayerResult(oci={"process": {"noNewPrivileges": True},
                            "linux": {"seccomp": seccomp}})
