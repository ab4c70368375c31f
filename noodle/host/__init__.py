"""The host layer: one module per operating-system mechanism the pool and
its kinds rely on, so that each has exactly one meaning.

* ``proc``: process identity, a ``(pid, start time)`` pair (pids are
  reused, so a pid alone names nobody), and killing or waiting for one
  process or a whole instance tree;
* ``cgroup``: finding the cgroup v1/v2 hierarchies and a slot's cgroup with
  memory and pids limits;
* ``mounts``: mount/umount without a subprocess, the mount table;
* ``launch``: starting a detached process (new session, not our child), its
  pidfile and the tail of its log;
* ``sched``: the CPU share of the pool's refill work (its session's
  autogroup nice value).
"""
