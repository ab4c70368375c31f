"""The systemd unit for ``noodle serve``, one instance per pool, beside ``noodle@``."""

from __future__ import annotations

SERVE_UNIT = """\
# pool-noodle fleet member: takes jobs from NATS JetStream into pool %i.
#   noodle unit --serve > /etc/systemd/system/noodle-serve@.service
#   install -m 0640 fleet.toml /etc/noodle/%i.fleet.toml   # servers, classes, credentials
#   systemctl daemon-reload && systemctl enable --now noodle@demo noodle-serve@demo
[Unit]
Description=pool-noodle fleet serve for pool %i
Documentation=https://pypi.org/project/pool-noodle/
# no pool, no serve: stopped with it, started after it
BindsTo=noodle@%i.service
After=noodle@%i.service network-online.target
Wants=network-online.target

[Service]
# READY=1 once connected and consuming
Type=notify
NotifyAccess=main
# credentials live in the config file (mode 0640 or stricter) or in
# NOODLE_NATS_* from the environment file, never on the command line
ExecStart={exe} serve --name %i --config /etc/noodle/%i.fleet.toml
EnvironmentFile=-/etc/noodle/%i.fleet.env
# SIGTERM: stop fetching, finish running jobs, publish their results, ack
KillMode=mixed
KillSignal=SIGTERM
TimeoutStopSec=330
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
"""


def serve_unit(exe: str = "/usr/local/bin/noodle") -> str:
    return SERVE_UNIT.replace("{exe}", exe)
