"""The centre's PostgreSQL fixture is a real server: durable, de-duplicating inserts behave as the store will need."""

import pytest

psycopg = pytest.importorskip("psycopg")


def test_a_real_server_deduplicates_by_device_and_sequence(postgres):
    with psycopg.connect(postgres.dsn, autocommit=True) as db:
        assert db.execute("SHOW fsync").fetchone() == ("on",)
        db.execute("CREATE TABLE messages (device text, seq bigint, event_id uuid, PRIMARY KEY (device, seq))")
        insert = "INSERT INTO messages VALUES (%s, %s, %s) ON CONFLICT (device, seq) DO NOTHING RETURNING event_id"
        first = db.execute(insert, ("cp-1", 1, "00000000-0000-4000-8000-000000000001")).fetchone()
        again = db.execute(insert, ("cp-1", 1, "00000000-0000-4000-8000-000000000002")).fetchone()
        assert first is not None and again is None
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (1,)
        db.execute("DROP TABLE messages")


def test_the_server_listens_on_its_socket_only(postgres):
    with psycopg.connect(postgres.dsn) as db:
        assert db.execute("SHOW listen_addresses").fetchone() == ("",)
