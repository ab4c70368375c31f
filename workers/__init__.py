"""Stage-worker processes of a pool-noodle supervisor (installed as
``noodle.workers``; the repository keeps them in ``workers/``).

Each worker serves one stage (clean, prepare, spawn, terminate): it takes
``[1, slot, gen]`` tasks from its POSIX queue, claims the slot by CAS in the
slot table, runs the kind's step, moves the slot on and dispatches the next
stage by the rules of ``noodle.lifecycle``. The supervisor forks them
(``noodle.seats``) and replaces any that die; a worker never decides a
slot's fate on its own beyond its step.
"""

#: exit code of a worker that could not start (bad kind, cannot attach):
#: the supervisor stops instead of restarting it in a loop (gunicorn's rule)
WORKER_BOOT_ERROR = 3
