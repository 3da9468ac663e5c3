"""Decoded sync states by the exact text they are stored as, so that an agent's state is decoded
from JSON once, not on every observation.

Why it is safe: an entry is used only when the row's text, read in the same transaction, is exactly
the text the entry was saved as; any other writer (another instance, a CLI command, a migration)
that changed the row changed its text, and a save that was rolled back left the row's older text,
which its entry does not match. The cache keeps a copy (``clone``) of what is saved (or the object
itself when its saver hands it over: the engine, which drops its states once saved) and hands that
out once, to the next transaction that reads the same text (and forgets it), so a caller that
changes a state it loaded or saved changes nothing here. On PostgreSQL the statements read the
``json`` column as its text (``doc::text``: the type keeps the text as written), for the same test.

Why it pays: decoding a state (``json.loads`` and ``state_doc.from_doc``: every datetime parsed) was
a fifth of the engine's time per observation (py-spy, ``bench/webhook_bench.py``); a copy costs a
quarter of that. Bounded (least recently used first out), so 50,000 agents do not keep 50,000 states.
"""

from __future__ import annotations

from collections import OrderedDict

from mapping.model import AgentSyncState, clone
from service.store.state_doc import decode

SIZE = 2048
"""States kept: the agents changing now (a burst's, most of a sweep batch's); about 4 KB each, so
about 9 MB at most (a 50,000-agent ``serve`` must stay under 300 MB, ``bench/scale.py``)."""


class StateCache:
    def __init__(self, size: int = SIZE) -> None:
        self.size = size
        self._items: OrderedDict[str, tuple[str, AgentSyncState]] = OrderedDict()

    def decode(self, agent_id: str, text: str) -> AgentSyncState:
        """The state stored as ``text``, its JSON document. A hit is handed out as it is and leaves
        the cache (the caller owns it and may change it; its transaction keeps what it saves): no
        copy on the way out, and none on a miss either."""
        hit = self._items.pop(agent_id, None)
        if hit is not None and hit[0] == text:
            return hit[1]
        return decode(agent_id, text)

    def keep(self, agent_id: str, text: str, state: AgentSyncState, *, copy: bool = True) -> None:
        """``state`` was just stored as ``text``. ``copy`` False: the saver handed the object over
        (``Transaction.save_states``), so it is kept as it is; the engine's saves are, and the copy
        was a tenth of its time per observation (py-spy, ``bench/webhook_bench.py``)."""
        self._put(agent_id, text, clone(state) if copy else state)

    def _put(self, agent_id: str, text: str, state: AgentSyncState) -> None:
        if self.size <= 0:
            return
        self._items[agent_id] = (text, state)
        self._items.move_to_end(agent_id)
        while len(self._items) > self.size:
            self._items.popitem(last=False)
