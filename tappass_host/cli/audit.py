"""`tappass-host audit verify | tail`: check and print the audit log (DESIGN §10)."""

import click

from tappass_host.cli import pass_host


@click.group()
def audit():
    """Verify or print the tamper-evident audit log."""


@audit.command()
@pass_host
def verify(host):
    """Check the whole hash chain and every signature."""
    from tappass_host.audit import AuditLog, AuditLogBroken

    report = AuditLog.for_host(host.paths).verify()
    if not report.ok:
        raise AuditLogBroken(report.broken_line, report.problem)
    noun = "event" if report.events == 1 else "events"
    host.emit({"ok": True, "events": report.events}, f"audit log OK: {report.events} {noun}")


@audit.command()
@click.option("-n", "--lines", "count", type=click.IntRange(min=0), default=20,
              show_default=True, help="How many of the latest events to print.")
@pass_host
def tail(host, count):
    """Print the latest events, oldest first (--json: a JSON array)."""
    from tappass_host.audit import AuditLog

    events = AuditLog.for_host(host.paths).tail(count)
    host.emit(events, "\n".join(_describe(e) for e in events) if events else None)


def _describe(event: dict) -> str:
    from tappass_host.strictjson import canonical

    details = canonical(event["details"]).decode("utf-8") if event["details"] else ""
    fields = (event["ts"], f"#{event['seq']}", event["event"], event["sandbox"] or "-", details)
    return "  ".join(fields).rstrip()
