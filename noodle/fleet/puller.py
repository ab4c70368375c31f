"""A pull request that never yields more jobs than it asked for.

nats-py's ``fetch`` ends a pull on a client-side deadline; under load the
server may still deliver the rest of that batch afterwards, and the next
``fetch`` returns those leftovers on top of its own batch. For flow control
by ready instances that is one job too many: here a pull ends only on the
server's word (a 404/408 status: nothing more will come for it) or after
``n`` jobs, and one pull returns at most ``n`` messages; a leftover from a
pull lost to a server restart is counted against the next pull's ``n``.
"""

from __future__ import annotations

import json
import logging

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger("noodle.fleet.serve")

_END = ("404", "408")  # no messages / request expired: the pull is over
_HEARTBEAT = "100"


class Puller:
    def __init__(self, nc: NATS, stream: str, consumer: str) -> None:
        self._nc = nc
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = nc.new_inbox()
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._inbox)

    async def pull(self, n: int, wait: float) -> list[Msg]:
        """Up to ``n`` jobs: those waiting now (a no-wait pull of ``n``); if
        there are none, the first to arrive within ``wait`` seconds (a pull
        of one, so a job is handed on at once and never more are held)."""
        msgs = await self._request({"batch": n, "no_wait": True}, n, 5.0)
        if not msgs:
            msgs = await self._request({"batch": 1, "expires": int(wait * 1e9)}, 1, wait + 5.0)
        return msgs

    async def _request(self, req: dict[str, object], n: int, limit: float) -> list[Msg]:
        assert self._sub is not None
        await self._nc.publish(self._next, json.dumps(req).encode(), reply=self._inbox)
        msgs: list[Msg] = []
        while len(msgs) < n:
            try:
                # the server ends the pull itself (404/408); the limit only
                # covers a pull lost with a server restart
                msg = await self._sub.next_msg(timeout=limit)
            except nats.errors.TimeoutError:
                break
            status = (msg.headers or {}).get("Status", "")
            if not status:
                msgs.append(msg)
            elif status in _END:
                break
            elif status != _HEARTBEAT:
                # 409: max waiting, consumer deleted, leadership change...
                log.debug("pull ended with %s %s", status, (msg.headers or {}).get("Description", ""))
                break
        return msgs
