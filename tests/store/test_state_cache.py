"""``service.store.state_cache``: a state is decoded once, and the cache is never the reason a
transaction sees something other than what the row holds."""

from __future__ import annotations

from mapping.model import AgentSyncState
from service.store.state_cache import StateCache
from service.store.state_doc import encode
from tests.support import ALICE, BUSY


async def test_another_writers_change_is_read_not_the_cached_state(open_sql, sql_url):
    """Two stores on one database stand for two instances (or ``serve`` and a CLI command)."""
    one, two = await open_sql(sql_url), await open_sql(sql_url)
    agent = ALICE.dynamics_user_id
    async with one.transaction() as tx:
        await tx.save_state(AgentSyncState(agent, own_dynamics="first"))
    async with one.transaction() as tx:
        assert (await tx.load_state(agent)).own_dynamics == "first"  # cached now
    async with two.transaction() as tx:
        await tx.save_state(AgentSyncState(agent, own_dynamics="second"))
    async with one.transaction() as tx:
        assert (await tx.load_state(agent)).own_dynamics == "second"


async def test_a_rolled_back_save_is_not_what_the_next_transaction_loads(open_sql, sql_url):
    store = await open_sql(sql_url)
    agent = ALICE.dynamics_user_id
    async with store.transaction() as tx:
        await tx.save_state(AgentSyncState(agent, own_dynamics="kept"))
    try:
        async with store.transaction() as tx:
            await tx.save_state(AgentSyncState(agent, own_dynamics="rolled back"))
            raise RuntimeError("the engine failed")
    except RuntimeError:
        pass
    async with store.transaction() as tx:
        assert (await tx.load_state(agent)).own_dynamics == "kept"


def test_changing_a_loaded_or_saved_state_changes_nothing_kept():
    cache = StateCache()
    saved = AgentSyncState("a", own_dynamics=BUSY)
    text = encode(saved)
    cache.keep("a", text, saved)
    saved.own_dynamics = "changed after saving"
    saved.session_unacked.append("x")
    loaded = cache.decode("a", text)
    assert (loaded.own_dynamics, loaded.session_unacked) == (BUSY, [])
    loaded.teams_seen.value = "changed after loading"
    assert cache.decode("a", text).teams_seen.value is None


def test_bounded_least_recently_used_first_out():
    cache = StateCache(2)
    texts = {name: encode(AgentSyncState(name)) for name in "abc"}
    for name in "ab":
        cache.keep(name, texts[name], AgentSyncState(name))
    cache.keep("a", texts["a"], AgentSyncState("a"))  # a saved again: b is now the oldest
    cache.keep("c", texts["c"], AgentSyncState("c"))
    assert set(cache._items) == {"a", "c"}


def test_a_hit_is_handed_out_once():
    """The caller owns what it loaded: the cache forgets it instead of copying it."""
    cache = StateCache()
    text = encode(AgentSyncState("a", own_dynamics=BUSY))
    cache.keep("a", text, AgentSyncState("a", own_dynamics=BUSY))
    first = cache.decode("a", text)
    first.own_dynamics = "changed by its owner"
    assert cache.decode("a", text).own_dynamics == BUSY  # decoded from the text again


async def test_a_saved_state_is_loaded_without_decoding_its_text(open_sql, sql_url, monkeypatch):
    """On both stores (PostgreSQL reads the json column as its text for this)."""
    import service.store.state_cache as state_cache
    from service.store import state_doc

    decoded: list[str] = []
    real = state_doc.from_doc

    def spy(agent_id: str, doc: dict) -> AgentSyncState:
        decoded.append(agent_id)
        return real(agent_id, doc)

    monkeypatch.setattr(state_doc, "from_doc", spy)
    monkeypatch.setattr(state_cache, "from_doc", spy, raising=False)  # wherever a decoder holds it
    store = await open_sql(sql_url)
    agent = ALICE.dynamics_user_id
    async with store.transaction() as tx:
        await tx.save_state(AgentSyncState(agent, own_dynamics=BUSY))
    async with store.transaction() as tx:
        assert (await tx.load_state(agent)).own_dynamics == BUSY
    assert decoded == []


async def test_a_handed_over_save_is_kept_as_it_is_and_a_plain_one_as_a_copy(open_sql, sql_url):
    """The engine hands its states over (it drops them once saved): the next transaction gets that
    very object, no copy made. A plain save is copied, so its caller may go on changing it."""
    store = await open_sql(sql_url)
    agent = ALICE.dynamics_user_id
    handed = AgentSyncState(agent, own_dynamics=BUSY)
    async with store.transaction() as tx:
        await tx.save_states([handed], handed_over=True)
    async with store.transaction() as tx:
        assert await tx.load_state(agent) is handed
    kept = AgentSyncState(agent, own_dynamics="kept")
    async with store.transaction() as tx:
        await tx.save_states([kept])
    kept.own_dynamics = "changed after saving"
    async with store.transaction() as tx:
        loaded = await tx.load_state(agent)
    assert loaded is not kept and loaded.own_dynamics == "kept"
