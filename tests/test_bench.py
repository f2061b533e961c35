"""The benchmark's own code (bench/), at a tiny scale against the suite's server.

It runs end to end, its figures are positive and consistent with each other, and
every method (the one-shot rewrite, the runbook's naive loop, our full_migration)
ends with the same data, the rollback with the original.  No timing is asserted:
speed is what the benchmark reports, not what the suite checks.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from bench import methods, probe, run
from bench.run import (
    DEFAULT_BATCH,
    NO_LAG_LIMIT,
    RUNBOOK_STEPS,
    SKIPPABLE,
    BenchError,
    main,
    measure,
    render_markdown,
    render_replay_lag,
    run_benchmark,
)
from bench.standby import ReplayLag, Standby, caught_up, start_standby
from bench.write_cost import SCRIPTS, STATES, WriteCostSettings, compare
from migration.backup import CHANGE_LOG_TRIGGER
from migration.connection import connect
from migration.rehearsal.sandbox import OWNER_ROLE, Sandbox, prepare
from migration.rehearsal.seed import seed
from migration.rehearsal.throwaway import Server, start_cluster
from tests.operate import execute, wait_until
from tests.replicas import server_bin_dir

# The benchmark's own tests: its figures are the engine's, tested on every server elsewhere.
pytestmark = pytest.mark.once

USERS = 200
ROWS = 6 * USERS  # S users, 3S journal entries, S tags, S reminders
KEYS = {"users": ["id"], "journal_entries": ["user_id"], "tags": ["user_id"],
        "reminders": ["user_id"]}


@pytest.fixture(scope="module")
def report(sandbox: Sandbox) -> dict[str, Any]:
    return run_benchmark(sandbox, [USERS], [100], sample_interval=0.002)


def _by_label(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["label"]: r for r in report["scales"][0]["results"]}


def test_every_method_ran_once_on_the_same_rows(report: dict[str, Any]) -> None:
    scale = report["scales"][0]
    assert scale["rows"] == ROWS
    assert scale["rows_by_table"] == {"users": USERS, "journal_entries": 3 * USERS,
                                      "tags": USERS, "reminders": USERS}
    methods_run = [r["method"] for r in scale["results"]]
    assert methods_run == ["one_shot", "naive_loop", "full_migration", "full_migration",
                           "verify", "rollback"]
    assert sorted(r["batch_size"] for r in scale["results"]
                  if r["method"] == "full_migration") == [100, DEFAULT_BATCH]


def test_figures_are_positive_and_consistent(report: dict[str, Any]) -> None:
    results = report["scales"][0]["results"]
    for r in results:
        assert r["wall_s"] > 0, r["label"]
        assert r["rows"] == ROWS
        assert r["rows_per_s"] == pytest.approx(ROWS / r["wall_s"])
        assert r["peak_rss_bytes"] > 0
        assert r["size_after"]["total"] > 0
        assert r["size_before"]["total"] > 0
        assert r["locks"]["samples"] > 0
        assert 0 <= r["max_access_exclusive_s"] <= r["max_write_blocking_s"] + 1e-9
        # A hold cannot outlast the method by more than the sampling gaps around it.
        assert r["max_write_blocking_s"] <= r["wall_s"] + 2 * r["locks"]["max_gap_s"]
        for hold in r["locks"]["access_exclusive"].values():
            assert 0 <= hold["lower"] <= hold["upper"]
    by_method = {r["method"]: r for r in results}
    assert by_method["one_shot"]["ratio_to_one_shot"] == 1
    assert by_method["one_shot"]["max_access_exclusive_s"] > 0  # the sampler saw the rewrite
    assert by_method["verify"]["max_access_exclusive_s"] == 0  # read-only
    for name in ("one_shot", "naive_loop", "full_migration", "rollback"):
        assert by_method[name]["wal_bytes"] > 0, name
        assert by_method[name]["wal_ratio_to_one_shot"] == pytest.approx(
            by_method[name]["wal_bytes"] / by_method["one_shot"]["wal_bytes"])
    # WAL by step: the engine's steps (or none running), all of it the one-shot's "-"
    by_step = by_method["full_migration"]["wal_bytes_by_step"]
    assert set(by_step) <= {*RUNBOOK_STEPS, "full_migration", "-"}
    assert sum(by_step.values()) > 0
    assert set(by_step) & set(RUNBOOK_STEPS)  # the steps fill the run: some are sampled
    assert set(by_method["one_shot"]["wal_bytes_by_step"]) == {"-"}
    # the fill updates every row with a key at least once (HOT ones among them): all but
    # the seed's reminders without a user (one in ten)
    filled = by_method["full_migration"]["updates"]
    assert sum(u["updated"] for u in filled.values()) >= ROWS - USERS // 10, filled
    assert all(0 <= u["hot"] <= u["updated"] for u in filled.values()), filled
    ours = [r for r in results if r["method"] == "full_migration"]
    assert sum(r["best"] for r in results) == 1
    assert next(r for r in results if r["best"]) in ours
    assert all(r["size_after"]["backup"] > 0 for r in ours)  # the backup is kept
    assert by_method["one_shot"]["size_after"]["backup"] == 0
    default = next(r for r in ours if r["default"])
    assert by_method["verify"]["ratio_to_full_migration"] == pytest.approx(
        by_method["verify"]["wall_s"] / default["wall_s"])


def test_full_migration_steps_come_from_migration_log(report: dict[str, Any]) -> None:
    for r in report["scales"][0]["results"]:
        if r["method"] != "full_migration":
            continue
        steps = {s["operation"]: s for s in r["steps"]}
        assert set(RUNBOOK_STEPS) | {"full_migration"} <= set(steps)
        assert all(s["status"] == "completed" for s in r["steps"])
        assert all(s["seconds"] >= 0 for s in r["steps"])
        assert sum(steps[name]["seconds"] for name in RUNBOOK_STEPS) <= \
            steps["full_migration"]["seconds"] <= r["wall_s"]
        assert any("backfill done" in e["message"] for e in r["timeline"])


def test_every_method_ends_with_the_same_data(report: dict[str, Any]) -> None:
    results = report["scales"][0]["results"]
    assert all(r["data_equal"] for r in results if r["method"] != "verify")
    digests = report["scales"][0]["digests"]
    assert {t: d["rows"] for t, d in digests["migrated"].items()} == \
        {t: d["rows"] for t, d in digests["original"].items()}


def test_report_renders_and_serialises(report: dict[str, Any], tmp_path: Path) -> None:
    text = render_markdown(report)
    for label in _by_label(report):
        assert label in text
    assert "### Targets" in text
    assert "WAL x one-shot" in text
    assert "(default): WAL MiB |" in text
    assert {t["target"].split(" ")[0] for t in report["targets"]} >= {"full_migration",
                                                                      "longest", "verify"}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report, default=str))
    assert render_markdown(json.loads(path.read_text())) == text
    assert report["server"]["version"]


@pytest.fixture
def seeded(sandbox: Sandbox) -> Iterator[str]:
    """Owner DSN of a fresh legacy database with a tiny seeded dataset."""
    name = "bench_inproc"
    sandbox.drop_database(name)
    dsn = sandbox.create_database(name)
    conn = connect(dsn)
    try:
        seed(conn, 50)
    finally:
        conn.close()
    try:
        yield dsn
    finally:
        sandbox.drop_database(name)


def test_reference_methods_in_process_reach_the_expected_data(seeded: str) -> None:
    expected = probe.data_digest(seeded, KEYS)
    assert methods.naive_loop(seeded, batch_size=7) == 6 * 50
    assert probe.data_digest(seeded, KEYS) == expected


def test_one_shot_in_process_and_lock_sampler(sandbox: Sandbox, seeded: str) -> None:
    expected = probe.data_digest(seeded, KEYS)
    with probe.LockSampler(sandbox.admin_dsn_for("bench_inproc"), list(KEYS),
                           interval=0.001) as sampler:
        assert methods.one_shot(seeded) == 6 * 50
        conn = connect(seeded)
        try:  # a hold the sampler cannot miss: taken, then kept until the sampler sees it
            with conn, conn.cursor() as cur:
                cur.execute("LOCK TABLE public.tags IN ACCESS EXCLUSIVE MODE")
                seen = sampler.samples_taken()
                while sampler.samples_taken() < seen + 3:
                    cur.execute("SELECT pg_sleep(0.01)")
        finally:
            conn.close()
    locks = sampler.report()
    assert "tags" in locks.exclusive
    assert "tags" in locks.write_blocking
    assert locks.exclusive["tags"].upper >= locks.exclusive["tags"].lower > 0
    assert probe.data_digest(seeded, KEYS) == expected


def test_methods_can_be_skipped_but_not_the_one_shot_and_ours(sandbox: Sandbox) -> None:
    skipped = run_benchmark(sandbox, [USERS], [DEFAULT_BATCH], sample_interval=0.002,
                            skip=SKIPPABLE)
    assert [r["method"] for r in skipped["scales"][0]["results"]] == ["one_shot",
                                                                     "full_migration"]
    assert "### Targets" in render_markdown(skipped)
    with pytest.raises(SystemExit):
        main(["--skip", "one_shot"])


def test_a_failed_method_is_recorded_with_its_figures_when_not_checked(
        sandbox: Sandbox, seeded: str) -> None:
    """The rollback is measured with ``check=False``: a failed way out is reported, with
    its error, instead of aborting the run and losing the scale's other figures."""
    scale = {"tables": list(KEYS), "rows": 6 * 50}
    failing = [sys.executable, "-c",
               "import sys; sys.stderr.write('LockError: could not lock the tables\\n'); "
               "sys.exit(3)"]
    with pytest.raises(BenchError, match="could not lock the tables"):
        measure(sandbox, "bench_inproc", scale, "rollback", failing, sample_interval=0.002)
    result = measure(sandbox, "bench_inproc", scale, "rollback", failing,
                     sample_interval=0.002, check=False)
    assert result["exit_code"] == 3
    assert result["error"] == "LockError: could not lock the tables"
    assert result["wall_s"] > 0
    assert result["locks"]["samples"] > 0


WRITES_PER_STATE = 30


@pytest.fixture(scope="module")
def write_report(sandbox: Sandbox) -> dict[str, Any]:
    return run_benchmark(sandbox, [USERS], [DEFAULT_BATCH], sample_interval=0.002,
                         skip=SKIPPABLE,
                         write_cost=WriteCostSettings(transactions=WRITES_PER_STATE))


def test_write_cost_measures_each_state_with_the_engine_s_triggers_as_they_are(
        sandbox: Sandbox, write_report: dict[str, Any]) -> None:
    """Every state ran the same writes, none failed, and the triggers present were the
    ones the state is named for: the change log records every write while it exists."""
    result = write_report["scales"][0]["write_cost"]
    assert list(result["states"]) == list(STATES)
    assert result["engine_steps_s"].keys() == {"full_migration --postpone-swap",
                                               "full_migration", "cleanup_backup"}
    tables = {"users", "journal_entries", "tags", "reminders"}
    local = probe.ServerCpu(sandbox.admin_dsn).pid is not None  # not a server in Docker
    for name, state in result["states"].items():
        assert state["transactions"] == WRITES_PER_STATE, name
        assert state["failed"] == 0, name
        assert state["us_per_write"] == pytest.approx(1e6 / state["tps"]), name
        cpu = state["server_cpu_us_per_write"]  # 30 writes may take less than a clock tick
        assert (cpu is not None and cpu >= 0) if local else (cpu is None), name
    states = result["states"]
    assert states["before"]["triggers"] == states["cleaned"]["triggers"] == []
    assert states["before"]["change_log_rows_added"] is None
    assert states["cleaned"]["change_log_rows_added"] is None
    migrated = [t.split(": ") for t in states["migrated"]["triggers"]]
    assert all(trigger.startswith(CHANGE_LOG_TRIGGER) for _table, trigger in migrated)
    assert {table for table, _trigger in migrated} == tables
    expanded = states["expanded"]["triggers"]
    assert set(states["migrated"]["triggers"]) < set(expanded)  # and the sync triggers
    assert {t.split(": ")[0] for t in expanded
            if not t.split(": ")[1].startswith(CHANGE_LOG_TRIGGER)} == tables
    for name in ("expanded", "migrated"):  # one row of the log per write (one row each)
        assert states[name]["change_log_rows_added"] == WRITES_PER_STATE, name


def test_write_cost_compares_each_state_with_its_baseline_and_renders(
        write_report: dict[str, Any]) -> None:
    result = write_report["scales"][0]["write_cost"]
    states = result["states"]
    pairs = {(c["state"], c["baseline"]): c for c in result["comparisons"]}
    assert set(pairs) == {("expanded", "before"), ("migrated", "cleaned")}
    for (state, baseline), c in pairs.items():
        assert c["extra_us_per_write"] == pytest.approx(
            states[state]["us_per_write"] - states[baseline]["us_per_write"])
        assert c["ratio"] == pytest.approx(
            states[state]["us_per_write"] / states[baseline]["us_per_write"])
        with_cpu = states[state]["server_cpu_us_per_write"]
        without_cpu = states[baseline]["server_cpu_us_per_write"]
        if with_cpu is not None:
            assert c["extra_cpu_us_per_write"] == pytest.approx(with_cpu - without_cpu)
            assert c["cpu_ratio"] == (pytest.approx(with_cpu / without_cpu) if without_cpu
                                      else None)
    assert result["scripts"] == list(SCRIPTS)
    text = render_markdown(write_report)
    assert "Cost of the engine's triggers" in text
    for state in STATES:
        assert f"| {state} |" in text
    assert "change log, after full_migration until cleanup_backup (migrated / cleaned)" in text
    assert write_report["parameters"]["write_cost"]["transactions"] == WRITES_PER_STATE


@pytest.fixture(scope="module")
def streaming(pg_server: Server) -> Iterator[tuple[Sandbox, Standby]]:
    """A primary of its own (the suite's binaries) streaming to a standby made by
    ``bench.standby``, as ``bench/run.py --standby`` makes it."""
    bin_dir = server_bin_dir(pg_server)
    primary = start_cluster(bin_dir, backend=pg_server.backend)
    standby: Standby | None = None
    try:
        box = prepare(primary.admin_dsn, prefix="bench_standby")
        standby = start_standby(primary.admin_dsn, bin_dir)
        yield box, standby
    finally:
        if standby is not None:
            standby.stop()
        primary.stop()


def _on_standby(dsn: str, standby: Standby) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc.rsplit(":", 1)[0] + f":{standby.port}",
                       parts.path, parts.query, ""))


def test_replay_lag_sees_a_standby_that_falls_behind(
        streaming: tuple[Sandbox, Standby]) -> None:
    """With the standby's replay paused, WAL written on the primary is lag the sampler
    reports in bytes; once replay resumes, ``caught_up`` returns."""
    box, standby = streaming
    on_standby = _on_standby(box.admin_dsn, standby)
    execute(on_standby, "SELECT pg_wal_replay_pause()")
    try:
        with ReplayLag(box.admin_dsn, interval=0.01) as lag:
            execute(box.admin_dsn, "CREATE TABLE lag_probe AS "
                                   "SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
            assert wait_until(lambda: lag.max_bytes > 1_000_000, patience=60)
    finally:
        execute(on_standby, "SELECT pg_wal_replay_resume()")
        execute(box.admin_dsn, "DROP TABLE IF EXISTS lag_probe")
    assert lag.standbys == 1
    caught_up(box.admin_dsn, limit=120)
    assert execute(box.admin_dsn, "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn) "
                                  "FROM pg_stat_replication") == [(0,)]


def test_standby_mode_reports_each_method_s_replay_lag(
        streaming: tuple[Sandbox, Standby]) -> None:
    """Each method's lag; and full_migration's with ``--max-replica-lag`` (the one given)
    and without it (0), each on a clone of its own, side by side."""
    box, _standby = streaming
    report = run_benchmark(box, [USERS], [DEFAULT_BATCH], sample_interval=0.002,
                           skip=SKIPPABLE, standby=True, max_replica_lag=5.0)
    assert report["parameters"]["standby"] is True
    assert report["parameters"]["max_replica_lag_s"] == 5.0
    results = report["scales"][0]["results"]
    assert [(r["method"], r.get("max_replica_lag_s")) for r in results] == [
        ("one_shot", None), ("full_migration", 5.0), ("full_migration_no_lag_limit", 0.0)]
    assert results[1]["argv"][-2:] == ["--max-replica-lag", "5"]
    assert results[2]["argv"][-2:] == ["--max-replica-lag", "0"]
    assert results[2]["data_equal"] is True
    assert [r["replica_lag_paused_s"] for r in results[1:]] == [0.0, 0.0]  # never that far
    for r in report["scales"][0]["results"]:
        lag = r["replay_lag"]
        assert lag["samples"] > 0, r["label"]
        assert lag["standbys"] == 1, r["label"]  # streaming throughout
        assert lag["max_replay_lag_bytes"] >= 0
    assert [(m,) for m in ("pg_monitor",)] == execute(
        box.admin_dsn, "SELECT b.rolname FROM pg_auth_members m JOIN pg_roles b "
                       "ON b.oid = m.roleid JOIN pg_roles u ON u.oid = m.member "
                       "WHERE u.rolname = %s", (OWNER_ROLE,))
    text = render_markdown(report)
    assert "| longest replay lag MiB | longest replay lag s |" in text
    assert "| full_migration b=1000 (default) | " in text.split("longest replay lag s |")[1]
    side_by_side = text.split("full_migration (b=1000) with and without --max-replica-lag")[1]
    assert "| paused s |" in side_by_side
    assert "| with --max-replica-lag=5 | " in side_by_side
    assert "| without (--max-replica-lag=0) | " in side_by_side


def test_the_replay_lag_with_and_without_the_limit_is_printed_side_by_side() -> None:
    """From a report's figures (an earlier run's JSON): the two full_migration runs in one
    table, their lags and the seconds the limit held the fill back."""
    lag = {"max_replay_lag_bytes": 3 * 1024 * 1024, "max_replay_lag_s": 2.5, "samples": 9,
           "standbys": 1}
    results = [
        {"label": "full_migration b=1000 (default)", "method": "full_migration",
         "default": True, "wall_s": 30.0, "wal_bytes": 300 * 1024 * 1024,
         "replay_lag": lag, "max_replica_lag_s": 1.0, "replica_lag_paused_s": 4.5},
        {"label": NO_LAG_LIMIT, "method": "full_migration_no_lag_limit",
         "wall_s": 25.0, "wal_bytes": 300 * 1024 * 1024,
         "replay_lag": dict(lag, max_replay_lag_bytes=40 * 1024 * 1024, max_replay_lag_s=9.0),
         "max_replica_lag_s": 0.0, "replica_lag_paused_s": 0.0}]
    lines = render_replay_lag(results)
    assert "| with --max-replica-lag=1 | 30.00 | 300 | 3.0 | 2.50 | 4.5 |" in lines
    assert "| without (--max-replica-lag=0) | 25.00 | 300 | 40.0 | 9.00 | 0.0 |" in lines
    assert render_replay_lag(results[:1])[-1].startswith("| full_migration b=1000 (default) |")


def test_write_cost_comparison_has_no_cpu_ratio_to_a_baseline_of_no_tick() -> None:
    """A state too short for one clock tick of /proc reads 0 µs of CPU: its comparison
    gives the difference and no ratio (it divided by zero)."""
    state = {"tps": 100.0, "us_per_write": 10_000.0, "server_cpu_us_per_write": 0.0}
    states = {name: dict(state) for name in STATES}
    states["migrated"]["server_cpu_us_per_write"] = 300.0
    changelog = next(c for c in compare(states) if c["state"] == "migrated")
    assert changelog["extra_cpu_us_per_write"] == 300.0
    assert changelog["cpu_ratio"] is None
    states["cleaned"]["server_cpu_us_per_write"] = 100.0
    assert next(c for c in compare(states) if c["state"] == "migrated")["cpu_ratio"] == 3.0


def test_the_engine_s_digest_covers_its_subpackages(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A change to ``migration/engine/fill.py`` is a change of the engine measured (the
    digest read ``migration/*.py`` only, and two walks of the fill once had one digest)."""
    (tmp_path / "migration" / "engine").mkdir(parents=True)
    (tmp_path / "migration" / "cli.py").write_text("cli\n")
    fill = tmp_path / "migration" / "engine" / "fill.py"
    fill.write_text("walk by keys\n")
    monkeypatch.setattr(run, "REPO", tmp_path)
    before = run.engine_version()
    fill.write_text("walk by pages\n")
    assert run.engine_version() != before
