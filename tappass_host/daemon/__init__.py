"""The host daemon, `tappass-host daemon` (DESIGN §6, §7, §9).

- `loop`: `Daemon`, the main loop: one worker per enrolled sandbox,
  certificate renewal, supervision, the systemd watchdog;
- `worker`: `SandboxWorker` keeps one sandbox's keyring in step with the
  control plane over its event stream (`SyncSettings`);
- `supervision`: `Supervisor`, restarts, expiry and restarts on a policy
  change (`SupervisionSettings`);
- `renewal`: `RenewalSchedule`, certificate renewal on schedule;
- `notify`: systemd's notify protocol (sd_notify), also used by the egress
  service (tappass_host.network.service).

Nothing is imported here: `notify` stays cheap for the egress service.
"""
