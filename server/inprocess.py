"""A Flower Grid that delivers messages to ClientApps in this process, one site after another.

For tests, benchmarks and debugging only: it runs the real ``FedMoCo`` strategy and the
real ``ClientApp`` handlers without a SuperLink, Ray or subprocesses, so a fault test runs
in seconds and a benchmark can measure the server's memory on its own. Each site gets a
deep copy of its message (as it would after the wire) and keeps its ``Context`` (with
``state``) across rounds, as a SuperNode does. A handler that raises becomes an error
reply, as in Flower's runtime. Real runs use the simulation or deployment runtime.
"""

from __future__ import annotations

import copy
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

#: Node id the in-process "server" sends from (any id no site uses).
SERVER_NODE_ID = 1

Handler = Callable[[Message, Context], Message]


class InProcessGrid(Grid):
    """Sites = ``{node_id: (handler, Context)}``; ``handler`` is a ClientApp or a function.

    ``fail_on_round``: raise ``KeyboardInterrupt`` when the server starts sending its
    ``fail_on_round``-th non-empty batch of messages (its n-th round of this process): a
    server killed between rounds, for restart tests.
    ``timings``: per-delivery seconds, ``(round, node, seconds)``.
    """

    def __init__(self, sites: dict[int, tuple[ClientApp | Handler, Context]], *, run_id: int = 1,
                 fail_on_round: int | None = None) -> None:
        self.sites = sites
        self._run = Run.create_empty(run_id)
        self.fail_on_round = fail_on_round
        self.calls = 0
        self.timings: list[tuple[int, int, float]] = []
        self.sent: list[Message] = []  # the last round's messages, as sent
        self.replies: list[Message] = []  # the last round's replies, as received
        # Message() reads the sender's identity from TaskIdentity, which Flower's runtime
        # sets in a ServerApp process; here the test process plays the ServerApp.
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SERVER_NODE_ID
        TaskIdentity.task_id = 0

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id,
                       ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.sites)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("InProcessGrid delivers synchronously: use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("InProcessGrid delivers synchronously: use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages:  # e.g. the evaluate step of a strategy with fraction_evaluate=0
            return []
        self.calls += 1
        if self.fail_on_round is not None and self.calls >= self.fail_on_round:
            raise KeyboardInterrupt(f"server stopped before sending round {self.calls}")
        self.sent = messages
        self.replies = []
        for msg in self.sent:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            handler, context = self.sites[msg.metadata.dst_node_id]
            delivered = copy.deepcopy(msg)
            t0 = time.perf_counter()
            reply = deliver(handler, delivered, context)
            self.timings.append((self.calls, msg.metadata.dst_node_id, time.perf_counter() - t0))
            reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.replies.append(copy.deepcopy(reply))
        return list(self.replies)


def deliver(handler: ClientApp | Handler, msg: Message, context: Context) -> Message:
    """Call ``handler`` as Flower's runtime does: an exception becomes an error reply and the
    node's Context keeps its state from before the call."""
    saved_state = copy.deepcopy(context.state)
    try:
        return handler(msg, context)
    except Exception as exc:  # noqa: BLE001 - reported to the server, like Flower does
        context.state = saved_state
        reason = f"{type(exc)}:<'{exc}'>"
        traceback.print_exc()
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def make_context(node_id: int, node_config: dict[str, Any], run_config: dict[str, Any], run_id: int = 1) -> Context:
    """A fresh node Context, as a SuperNode creates for a new run."""
    return Context(run_id=run_id, node_id=node_id, node_config=dict(node_config), state=RecordDict(),
                   run_config=dict(run_config))
