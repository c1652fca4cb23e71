"""The console on PostgreSQL: pages and the event stream, fed by the schema's NOTIFY from another connection."""

from __future__ import annotations

import queue
import re
import threading
import time

import httpx
import pytest

from agent.centre.store_postgres import PostgresStore
from agent.config.centre import load_receiver_config
from agent.console.server import Console
from tests.centre.test_store_backends import alert_claims, fresh_database
from tests.console.conftest import ACCOUNTS, add_accounts

pytest.importorskip("psycopg")


def test_an_alert_stored_by_another_connection_reaches_an_open_console_page(site, postgres):
    dsn = fresh_database(postgres)
    path = site.receiver_toml_path()
    path.write_text(path.read_text().replace('id = "centre-1"\n', f'id = "centre-1"\ndatabase = "{dsn}"\n', 1))
    config = load_receiver_config(path)
    with Console(config, listen="127.0.0.1:0") as console, PostgresStore(dsn) as receiver_store:
        add_accounts(console.state)
        console.start()
        client = httpx.Client(base_url=console.url, timeout=10)
        token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
        assert (
            client.post("/login", data={"name": "ana", "password": ACCOUNTS["ana"][0], "csrf": token}).status_code
            == 303
        )
        events: queue.Queue[str] = queue.Queue()

        def listen():
            with client.stream("GET", "/events", timeout=None) as stream:
                for line in stream.iter_lines():
                    if line.startswith("event:"):
                        events.put(line)
                    if line == "event: queue":
                        return

        threading.Thread(target=listen, daemon=True).start()
        assert events.get(timeout=10) == "event: hello"
        stored = time.monotonic()
        receiver_store.insert(
            alert_claims(seq=7, alert_kind="assistance", location="Quay 4", silent=False), time.time()
        )
        while (event := events.get(timeout=5)) != "event: queue":
            assert event == "event: change"
        print(f"NOTIFY → queue event: {time.monotonic() - stored:.3f} s")
        fragment = client.get("/fragment/queue").text
        assert 'data-alert="cp-1/7"' in fragment and "Quay 4" in fragment
        client.close()
