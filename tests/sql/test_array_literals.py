"""The daemon sends worker_step's arrays as literals it builds (queries.uuid_array, text_array):
PostgreSQL must read back exactly the values given, whatever characters they hold."""

from __future__ import annotations

import uuid

from kernel_driver.queries import text_array, uuid_array

AWKWARD = ['plain', '', 'NULL', 'null', ' spaced ', 'a,b', '{braces}', 'quote "x"', 'back\\slash',
           '\\"', 'end\\', 'tab\tnew\nline', 'ünïcødé ✉', '{"json": [1, "two"]}', None]


def test_text_array_round_trips_every_awkward_value(conn) -> None:
    assert conn.execute("SELECT %s::text[]", [text_array(AWKWARD)]).fetchone()[0] == AWKWARD


def test_empty_arrays_are_empty(conn) -> None:
    assert conn.execute("SELECT %s::text[], %s::uuid[]", [text_array([]), uuid_array([])]).fetchone() == ([], [])


def test_uuid_array_round_trips(conn) -> None:
    ids = [uuid.uuid4() for _ in range(5)]
    assert conn.execute("SELECT %s::uuid[]", [uuid_array(ids)]).fetchone()[0] == ids
