"""The client's connection states and the transitions between them.

``SSE`` is reserved for a Server-Sent Events fallback: the table already allows it, so
adding that transport does not reshape the machine.
"""

from __future__ import annotations

import enum


class State(enum.StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    DISCONNECTED = "disconnected"
    SSE = "sse"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.DISCONNECTED: frozenset({State.CONNECTING}),
    State.CONNECTING: frozenset(
        {State.CONNECTED, State.RECONNECTING, State.DISCONNECTED, State.SSE}
    ),
    State.CONNECTED: frozenset({State.RECONNECTING, State.DISCONNECTED}),
    State.RECONNECTING: frozenset({State.CONNECTED, State.DISCONNECTED, State.SSE}),
    State.SSE: frozenset({State.CONNECTED, State.RECONNECTING, State.DISCONNECTED}),
}


class InvalidTransition(RuntimeError):
    """Raised when the client tries a state change the machine does not allow (a bug)."""


def check_transition(current: State, target: State) -> None:
    if target not in TRANSITIONS[current]:
        raise InvalidTransition(f"cannot go from state {current.value!r} to {target.value!r}")


# Close codes after which retrying cannot help (docs/protocol.md, "Close codes"): a normal
# close, a policy close (bad token or rate limit: retry only with a new token) and a
# frame too large (the client must be fixed). Every other code, and a connection that
# dropped without one, is retried with backoff and resumed.
TERMINAL_CLOSE_CODES = frozenset({1000, 1008, 1009})


def is_terminal_close(code: int | None) -> bool:
    return code in TERMINAL_CLOSE_CODES
