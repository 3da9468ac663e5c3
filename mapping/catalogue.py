"""The live ``msdyn_presences`` catalogue, cached in memory: translation needs it on every event."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from mapping.model import BasePresence, Presence


class Catalogue(Mapping[str, Presence]):
    """Presences by lower-case id, plus lookups by name for the bot."""

    def __init__(self, presences: Iterable[Presence] = ()) -> None:
        self._by_id: dict[str, Presence] = {}
        self.replace(presences)

    def replace(self, presences: Iterable[Presence]) -> None:
        self._by_id = {p.presence_id.lower(): p for p in presences}

    def __getitem__(self, key: str) -> Presence:
        return self._by_id[key.lower()]

    def get(self, key: str, default: Presence | None = None) -> Presence | None:  # type: ignore[override]
        return self._by_id.get(key.lower(), default) if key else default

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def by_name(self, name: str) -> Presence | None:
        wanted = " ".join(name.lower().split())
        for p in self._by_id.values():
            if " ".join(p.name.lower().split()) == wanted:
                return p
        return None

    def settable(self) -> list[Presence]:
        return sorted((p for p in self._by_id.values() if p.can_user_set), key=lambda p: (p.base, p.name))

    def first_of(self, base: BasePresence) -> Presence | None:
        return next((p for p in self._by_id.values() if p.base is base), None)
