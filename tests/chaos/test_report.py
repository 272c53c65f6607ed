"""``make chaos``'s one table: what each scenario's JSON line says, in one row per measure."""

from __future__ import annotations

from tests.chaos.report import table


def _run(database_faults: bool) -> dict[str, object]:
    faults = [{"kind": "broker wiped (FLUSHALL)", "in_flight": 299, "started": 300},
              {"kind": "broker restarted empty", "in_flight": 978, "started": 1000}]
    if database_faults:
        faults += [{"kind": "database restarted (fast)", "in_flight": 300, "started": 300},
                   {"kind": "database down 30s", "in_flight": 978, "started": 1000}]
    return {"sagas": 1000, "faults": faults, "worker_kills": 16, "pool_kills": 13, "lost": 0,
            "not_terminal": 1, "parked": 0, "doubled": 2, "audit_ok": False, "wall_s": 141.2}


def _hosts(fault: str) -> dict[str, object]:
    return {"fault": fault, "sagas": 370, "in_flight_at_fault": ["t1", "t2"],
            "not_terminal": [], "parked": 0, "changed_after_heal": [], "audit_ok": True,
            "wall_s": 86.0}


def test_the_table_names_every_fault_with_what_it_caught_and_fits_80_columns():
    text = table({"sqlite": _run(False), "postgresql": _run(True),
                  "partition": _hosts("partition"), "host killed": _hosts("kill")})
    rows = {line[:30].strip(): line[30:].split() for line in text.splitlines()[2:]}
    assert max(len(line) for line in text.splitlines()) <= 80, text
    assert rows["in flight at broker wipe"] == ["299/300", "299/300", "-", "-"]
    assert rows["in flight at db restarts"] == ["-", "300/300,", "978/1000", "-", "-"]
    assert rows["broker wipes/restarts"] == ["1/1", "1/1", "-", "-"]
    assert rows["database restarts"] == ["0", "2", "-", "-"]
    assert rows["partitions"] == ["0", "0", "1", "0"]
    assert rows["victim's steps in flight"] == ["-", "-", "2", "2"]
    assert rows["stuck"] == ["1", "1", "0", "0"]
    assert rows["doubled effects"] == ["2", "2", "0", "0"]
    assert rows["audit"] == ["FAILED", "FAILED", "clean", "clean"]
