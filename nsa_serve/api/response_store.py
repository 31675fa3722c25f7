"""Stored responses (`store: true`): what `GET /v1/responses/{id}` returns and what a later
request's `previous_response_id` continues. In memory, bounded in count and in characters (each
entry holds its whole conversation, so a long chain of continued responses is large): the oldest
are forgotten first, so a long-running server cannot grow without limit (a forgotten id is a 404,
as a deleted one)."""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class StoredResponse:
    body: dict  # the response object as returned
    conversation: list[dict]  # chat messages: the earlier turns and this one's input and output
    size: int = field(default=0, compare=False)  # characters, set by the store


def _size(item: StoredResponse) -> int:
    return len(json.dumps(item.body, ensure_ascii=False)) + len(json.dumps(item.conversation, ensure_ascii=False))


class ResponseStore:
    def __init__(self, capacity: int = 1024, max_chars: int = 64 * 2**20):
        self.capacity, self.max_chars = capacity, max_chars
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self.chars = 0

    def put(self, response_id: str, item: StoredResponse) -> None:
        if self.capacity <= 0:
            return
        item.size = _size(item)
        self.delete(response_id)
        self._items[response_id] = item
        self.chars += item.size
        while len(self._items) > self.capacity or (self.chars > self.max_chars and len(self._items) > 1):
            _, old = self._items.popitem(last=False)
            self.chars -= old.size

    def get(self, response_id: str) -> StoredResponse | None:
        return self._items.get(response_id)

    def delete(self, response_id: str) -> bool:
        item = self._items.pop(response_id, None)
        if item is None:
            return False
        self.chars -= item.size
        return True

    def __len__(self) -> int:
        return len(self._items)
