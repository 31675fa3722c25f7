"""Stored responses (`store: true`): what `GET /v1/responses/{id}` returns and what a later
request's `previous_response_id` continues. In memory, bounded: the oldest are forgotten first,
so a long-running server cannot grow without limit (a forgotten id is a 404, as a deleted one)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class StoredResponse:
    body: dict  # the response object as returned
    conversation: list[dict]  # chat messages: the earlier turns and this one's input and output


class ResponseStore:
    def __init__(self, capacity: int = 1024):
        self.capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, response_id: str, item: StoredResponse) -> None:
        if self.capacity <= 0:
            return
        self._items[response_id] = item
        self._items.move_to_end(response_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        return self._items.get(response_id)

    def delete(self, response_id: str) -> bool:
        return self._items.pop(response_id, None) is not None

    def __len__(self) -> int:
        return len(self._items)
