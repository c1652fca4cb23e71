"""The outbox keeps everything accepted, in order, through restarts, kill -9 and a full disk budget."""

import os
import signal
import subprocess
import sys
import textwrap

from agent.device.outbox import Outbox
from agent.protocol.messages import new_claims


def add(outbox: Outbox, kind: str = "alert"):
    needs_ack = kind != "telemetry"
    return outbox.add(kind, needs_ack, lambda seq: new_claims(device="d", site="s", seq=seq, kind=kind, body={}))


def test_sequence_numbers_strictly_increase_across_restarts(tmp_path):
    with Outbox(tmp_path / "o.sqlite") as outbox:
        first = [add(outbox).seq for _ in range(3)]
        assert outbox.next_sequence() == 4
    with Outbox(tmp_path / "o.sqlite") as outbox:
        assert add(outbox).seq == 5
    assert first == [1, 2, 3]


def test_database_is_wal_with_full_sync(tmp_path):
    with Outbox(tmp_path / "o.sqlite") as outbox:
        assert outbox._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert outbox._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_telemetry_leaves_on_puback_alerts_wait_for_the_centre(tmp_path):
    with Outbox(tmp_path / "o.sqlite") as outbox:
        alert, telemetry = add(outbox, "alert"), add(outbox, "telemetry")
        assert [e.seq for e in outbox.unpublished(10)] == [alert.seq, telemetry.seq]
        outbox.mark_published(alert.seq)
        outbox.mark_published(telemetry.seq)
        assert [e.seq for e in outbox.entries()] == [alert.seq]
        assert outbox.unpublished(10) == []
        assert outbox.acknowledge(alert.seq, "some-other-event") is None
        assert outbox.acknowledge(alert.seq, alert.event_id).seq == alert.seq
        assert outbox.depth() == 0


def test_unacknowledged_alerts_are_requeued(tmp_path):
    with Outbox(tmp_path / "o.sqlite") as outbox:
        alert = add(outbox)
        outbox.mark_published(alert.seq)
        assert outbox.requeue_unacknowledged(older_than_s=3600) == 0
        assert outbox.requeue_unacknowledged(older_than_s=-1) == 1
        assert [e.seq for e in outbox.unpublished(10)] == [alert.seq]


def test_holds_ten_thousand_and_drops_telemetry_first_never_alerts(tmp_path):
    with Outbox(tmp_path / "o.sqlite", capacity=10_000) as outbox:
        for i in range(10_000):
            add(outbox, "telemetry" if i % 2 else "alert")
        assert outbox.depth() == 10_000
        for _ in range(5_000):
            add(outbox, "alert")
        kinds = [e.kind for e in outbox.entries()]
        assert kinds.count("alert") == 10_000 and kinds.count("telemetry") == 0
        assert outbox.dropped_telemetry == 5_000
        assert add(outbox, "telemetry") is None
        assert add(outbox, "alert") is not None
        assert outbox.depth() == 10_001


def test_committed_rows_survive_kill_9(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.getcwd()!r})
        from agent.device.outbox import Outbox
        from agent.protocol.messages import new_claims
        outbox = Outbox({str(tmp_path / "o.sqlite")!r})
        for i in range(200):
            outbox.add("alert", True, lambda seq: new_claims(device="d", site="s", seq=seq, kind="alert", body={{"i": i}}))
        print("committed", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL and "committed" in result.stdout
    with Outbox(tmp_path / "o.sqlite") as outbox:
        assert [e.claims["body"]["i"] for e in outbox.entries()] == list(range(200))
        assert add(outbox).seq == 201
