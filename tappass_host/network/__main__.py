"""`python -m tappass_host.network`: the egress service (spawned by `start`;
as a service of its own it is `tappass-host egress`)."""

from tappass_host.network.service import main
from tappass_host.network.settings import parse

main(*parse())
