"""The Federation page in a real api-server: access control, live sites, runs and rounds.

Behind the page: three agents over mutual TLS (site-3 stopped before the second run and
left down), two runs of a weekly training DAG run by ``airflow dags test`` with real
PyTorch, their rounds committed to a real S3-protocol server. What the page shows is
checked against the agents, the snapshot store and Airflow's own API.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest
from plugin_browser import Chromium
from plugin_html import parse
from plugin_support import BROKEN_CONN_ID, DAG_ID, DOWN_SITE, REPO, SHARING_SITE
from s3_server import TEST_KEYS

from flare_provider.snapshots import SnapshotStore, encode_name

SCREENSHOT = REPO / "docs" / "images" / "federation-page.png"


@pytest.fixture(scope="module")
def admin(server) -> str:
    return server.token("admin")


@pytest.fixture(scope="module")
def run_ids(server, admin, trained) -> list[str]:
    """The DAG's runs as Airflow knows them, oldest first."""
    response = server.get(f"/api/v2/dags/{DAG_ID}/dagRuns", admin, params={"order_by": "run_after"})
    assert response.status_code == 200, response.text
    runs = response.json()["dag_runs"]
    assert [r["state"] for r in runs] == ["success", "success"], runs
    return [r["dag_run_id"] for r in runs]


@pytest.fixture(scope="module")
def store(airflow_home, trained) -> SnapshotStore:
    settings = {"endpoint_url": airflow_home.s3.endpoint, **TEST_KEYS}
    return SnapshotStore(airflow_home.snapshot_uri, s3_settings=settings)


def run_page(run_id: str) -> str:
    return "/flare/?" + urlencode({"federation": DAG_ID, "run": run_id})


def assert_no_data(body: str, federation, *more: str) -> None:
    """Nothing about the sites, the runs or any secret in ``body``."""
    for word in (*federation.sites, "127.0.0.1", "PRIVATE KEY", TEST_KEYS["aws_secret_access_key"], *more):
        assert word not in body


# ---- registration and access ----------------------------------------------------------


def test_plugin_is_registered_once_with_a_nav_entry(server, admin):
    response = server.get("/api/v2/plugins", admin)
    assert response.status_code == 200
    (plugin,) = [p for p in response.json()["plugins"] if p["name"] == "flare_federation"]
    assert [(a["url_prefix"], a["name"]) for a in plugin["fastapi_apps"]] == [("/flare", "Federation")]
    (view,) = plugin["external_views"]
    assert (view["name"], view["href"], view["url_route"], view["destination"]) == ("Federation", "/flare/", "federation", "nav")
    errors = server.get("/api/v2/plugins/importErrors", admin).json()
    assert errors["total_entries"] == 0, errors


def test_anonymous_and_forged_requests_get_no_data(server, federation, run_ids):
    for path, named in (("/flare/", [DAG_ID, *run_ids]), (run_page(run_ids[0]), [])):
        anonymous = server.get(path)
        assert anonymous.status_code == 401
        assert "Log in to Airflow" in anonymous.text  # back to this page after the login
        assert_no_data(anonymous.text, federation, *named, "val_accuracy", "round_0")
        for forged in (server.get(path, token="not-a-token"), server.get(path, cookies={"_token": "not-a-token"})):
            assert forged.status_code == 403
            assert_no_data(forged.text, federation, *named, "val_accuracy", "round_0")


def test_a_viewer_sees_the_runs_but_not_the_connections(server, federation, run_ids):
    response = server.get("/flare/", server.token("viewer"))
    assert response.status_code == 200
    page = parse(response.text)
    assert page.select("tr", data_site=True) == []  # no live site status
    assert "2 federation connections not shown: you may not read them" in page.one("section", id="sites-section").text
    assert "127.0.0.1" not in page.one("section", id="sites-section").text
    assert [r.attrs["data-run"] for r in page.one("table", id="runs").select("tr", data_run=True)] == run_ids[::-1]


def test_an_unknown_run_is_not_found(server, admin, federation):
    response = server.get(run_page("no-such-run"), admin)
    assert response.status_code == 404
    assert_no_data(response.text, federation, "val_accuracy", "round_0")


def test_the_round_in_progress_is_served_for_the_page_to_redraw(server, admin, federation):
    for path in ("/flare/live", "/flare/curves"):
        assert server.get(path).status_code == 401
    curves = server.get("/flare/curves", admin)
    assert curves.status_code == 200
    assert curves.json() == {"rounds": []}  # no site is training now (tests/tracking draws a round in progress)
    assert parse(server.get("/flare/live", admin).text).one("p", id="no-live-round")
    section = parse(server.get("/flare/", admin).text).one("section", id="live-section")
    assert section.attrs["data-refresh-seconds"] == "5" and section.one("p", id="no-live-round")


# ---- what the page shows --------------------------------------------------------------


def test_an_empty_store_says_so(page_before_runs, federation):
    assert page_before_runs.status_code == 200
    page = parse(page_before_runs.text)
    assert "No federation runs in s3://" in page.one("section", id="runs-section").text
    assert page.select("section", id="run-section") == []
    assert {r.attrs["data-site"] for r in page.select("tr", data_site=True)} == set(federation.sites)


def test_sites_are_shown_live_from_their_agents(server, admin, federation, trained):
    page = parse(server.get("/flare/", admin).text)
    rows = {r.attrs["data-site"]: r for r in page.one("table", data_conn_id=federation.conn_id).select("tr", data_site=True)}
    assert {site: row.attrs["data-state"] for site, row in rows.items()} == {
        "site-1": "reachable", "site-2": "reachable", DOWN_SITE: "unreachable",
    }
    for site in ("site-1", "site-2"):
        with federation.client(site) as client:
            status = client.status()
        text = rows[site].text
        assert status.version in text and "none (CPU)" in text
        (app,) = status.apps
        assert f"{app.name} {app.version[:10]}" in text
    assert "Connection refused" in rows[DOWN_SITE].text and "UNAVAILABLE" in rows[DOWN_SITE].text
    assert f"127.0.0.1:{federation.ports[DOWN_SITE]}" in rows[DOWN_SITE].text
    assert "2 of 3 sites reachable" in page.text
    # A connection without its key is named with what it lacks; the rest of the page stands.
    assert f"Cannot use connection {BROKEN_CONN_ID}:" in page.text and "lacks" in page.text
    assert "PRIVATE KEY" not in page.text and TEST_KEYS["aws_secret_access_key"] not in page.text


def test_runs_are_listed_newest_first_and_link_to_their_dag_runs(server, admin, run_ids):
    page = parse(server.get("/flare/", admin).text)
    rows = page.one("table", id="runs").select("tr", data_run=True)
    assert [r.attrs["data-run"] for r in rows] == run_ids[::-1]
    assert "2 accepted, 1 dropped" in rows[0].text and "3 accepted" in rows[1].text
    assert all("2 / 2 done" in r.text for r in rows)
    # The newest run is shown, linked to its DAG run, which Airflow's API knows.
    section = page.one("section", id="run-section")
    assert section.attrs["data-run"] == run_ids[-1]
    href = page.one("a", id="dag-run-link").attrs["href"]
    assert href == f"/dags/{DAG_ID}/runs/{quote(run_ids[-1], safe='')}"
    dag_run = server.get(f"/api/v2{href.replace('/runs/', '/dagRuns/')}", admin)
    assert dag_run.status_code == 200 and dag_run.json()["dag_run_id"] == run_ids[-1]


@pytest.mark.parametrize("week", [0, 1])
def test_a_run_shows_its_metrics_and_who_took_part_in_each_round(server, admin, store, run_ids, week):
    run_id = run_ids[week]
    history = store.latest(DAG_ID, run_id).state["history"]
    page = parse(server.get(run_page(run_id), admin).text)
    assert page.one("section", id="run-section").attrs["data-run"] == run_id

    for metric in ("val_accuracy", "val_loss"):
        chart = page.one("svg", class_="chart", data_metric=metric)
        points = chart.select("circle", class_="global")
        assert [int(p.attrs["data-round"]) for p in points] == [1, 2]
        for point, record in zip(points, history):
            assert math.isclose(float(point.attrs["data-value"]), record["metrics"][metric], rel_tol=1e-9)
    bars = page.one("svg", data_metric="round duration (s)").select("rect", class_="bar")
    assert [float(b.attrs["data-value"]) for b in bars] == [h["duration_s"] for h in history]

    rows = page.one("table", id="rounds").select("tr", data_round=True)
    assert [int(r.attrs["data-round"]) for r in rows] == [1, 2]
    for row, record in zip(rows, history):
        cells = {c.attrs["data-site"]: c for c in row.select("td", data_site=True)}
        for site in ("site-1", "site-2"):
            assert cells[site].attrs["data-state"] == "accepted"
            assert f"{record['sites'][site]['num_samples']:,} samples" in cells[site].text
        if week == 0:
            assert cells[DOWN_SITE].attrs["data-state"] == "accepted"
        else:
            assert cells[DOWN_SITE].attrs["data-state"] == "dropped"
            assert "submit failed" in cells[DOWN_SITE].text and "UNAVAILABLE" in cells[DOWN_SITE].attrs["title"]


@pytest.mark.parametrize("week", [0, 1])
def test_a_run_shows_its_cross_site_matrix(server, admin, store, run_ids, week):
    """The table per metric holds the matrix the run stored: every model (the global one, and
    site-1's, the one site that shares) at every site; site-3 was down in week 1."""
    from flare_provider.federation.cross_site_matrix import read_matrix

    run_id = run_ids[week]
    matrix = read_matrix(store, DAG_ID, run_id)
    assert matrix.model_names == ["global", SHARING_SITE]
    page = parse(server.get(run_page(run_id), admin).text)
    section = page.one("div", id="cross-site")
    # site-3 dropped out of week 1's rounds: only site-2 declined to share a model of its last round.
    assert f"Not shared by their sites: {'site-2, site-3' if week == 0 else 'site-2'}." in section.text
    for metric in ("accuracy", "loss"):
        rows = section.one("table", data_metric=metric).select("tr", data_model=True)
        assert [(r.attrs["data-model"], r.attrs["data-kind"]) for r in rows] == [("global", "global"), (SHARING_SITE, "local")]
        for row in rows:
            model = row.attrs["data-model"]
            cells = {c.attrs["data-site"]: c for c in row.select("td", data_site=True)}
            assert sorted(cells) == ["site-1", "site-2", "site-3"]
            for site, cell in cells.items():
                if week == 1 and site == DOWN_SITE:
                    assert site not in matrix.values[model] and cell.attrs["data-state"] == "error"
                    assert cell.attrs["title"] == matrix.errors[model][site] and "UNAVAILABLE" in cell.attrs["title"]
                else:
                    assert math.isclose(float(cell.attrs["data-value"]), matrix.values[model][site][metric], rel_tol=1e-9)
            mean = float(row.one("td", class_="mean").attrs["data-value"])
            assert math.isclose(mean, matrix.mean(model, metric), rel_tol=1e-9)


def test_a_damaged_round_is_skipped_and_named(server, admin, airflow_home, run_ids, federation):
    run_id = run_ids[0]
    key = f"federations/{DAG_ID}/{encode_name(run_id)}/round_00002/state.json"
    s3 = airflow_home.s3.client()
    original = s3.get_object(Bucket=airflow_home.bucket, Key=key)["Body"].read()
    damaged = original.replace(b'"round":2', b'"round":7')  # same size, another SHA-256
    assert damaged != original
    s3.put_object(Bucket=airflow_home.bucket, Key=key, Body=damaged)
    try:
        page = parse(server.get("/flare/", admin).text)
        row = page.one("tr", data_run=run_id)
        assert "1 / 2" in row.text and "1 round skipped (damaged)" in row.text
        assert page.one("tr", data_run=run_ids[1]).select("div", class_="reason") == []

        page = parse(server.get(run_page(run_id), admin).text)
        (note,) = page.select("p", class_="skipped")
        assert "round_00002" in note.text and "does not match its SHA-256" in note.text
        assert [r.attrs["data-round"] for r in page.one("table", id="rounds").select("tr", data_round=True)] == ["1"]
        assert len(page.one("svg", data_metric="val_accuracy").select("circle", class_="global")) == 1
    finally:
        s3.put_object(Bucket=airflow_home.bucket, Key=key, Body=original)


def test_no_key_or_password_reaches_the_server_log(server, admin, federation, trained):
    assert server.get("/flare/", admin).status_code == 200
    log = server.log_tail(10**8)
    assert "/flare/" in log  # the log is the api-server's, with this request in it
    for secret in ("PRIVATE KEY", TEST_KEYS["aws_secret_access_key"], *server.home.passwords.values()):
        assert secret not in log


# ---- in a browser ---------------------------------------------------------------------


def test_the_page_renders_in_chromium_after_the_airflow_login(server, airflow_home, run_ids, tmp_path):
    with Chromium(tmp_path / "profile") as browser:
        # The login form of Airflow's UI, typed into as a user would.
        browser.call("Page.navigate", url=f"{server.url}/auth/login?next=/flare/")
        browser.wait_for("!!document.querySelector('input[name=password]')")
        for name, value in (("username", "admin"), ("password", airflow_home.passwords["admin"])):
            browser.evaluate(f"document.querySelector('input[name={name}]').focus()")
            browser.call("Input.insertText", text=value)
        browser.wait_for("!document.querySelector('button[type=submit]').disabled")
        browser.evaluate("document.querySelector('button[type=submit]').click()")
        browser.wait_for("location.pathname === '/flare/' && !!document.querySelector('#run-section')")

        drawn = browser.evaluate("""(() => {
            const chart = document.querySelector('svg.chart[data-metric="val_accuracy"]');
            const box = chart.getBoundingClientRect();
            return {
                width: box.width, height: box.height,
                points: chart.querySelectorAll('circle.point.global').length,
                sites: Array.from(document.querySelectorAll('table.sites tr[data-site]')).map(r => r.dataset.state),
                rounds: document.querySelectorAll('#rounds tr[data-round]').length,
                runs: Array.from(document.querySelectorAll('#runs tr[data-run]')).map(r => r.dataset.run),
            };
        })()""")
        assert drawn["width"] > 200 and drawn["height"] > 100
        assert drawn["points"] == 2 and drawn["rounds"] == 2
        assert drawn["sites"] == ["reachable", "reachable", "unreachable"]
        assert drawn["runs"] == run_ids[::-1]

        # In the Airflow UI: the nav entry opens the page inside the UI, with the same login.
        browser.navigate(f"{server.url}/plugin/federation")
        browser.wait_for("""(() => {
            const frame = document.querySelector('iframe');
            return !!frame && frame.src.endsWith('/flare/') && !!frame.contentDocument.querySelector('#run-section');
        })()""")
        assert browser.evaluate("Array.from(document.querySelectorAll('nav a, a')).some(a => a.textContent.includes('Federation'))")
        if os.environ.get("FLARE_SAVE_SCREENSHOT") == "1":
            save_screenshot(browser, SCREENSHOT)

        # The UI's frame may not navigate the window; the run's link still opens the DAG run in the UI.
        frame_link = "document.querySelector('iframe').contentDocument.querySelector('#dag-run-link')"
        href = browser.evaluate(f"{frame_link}.getAttribute('href')")
        browser.evaluate(f"{frame_link}.click()")
        browser.wait_for(f"location.pathname === {json.dumps(href)} && document.body.innerText.includes({json.dumps(run_ids[-1])})")
        assert browser.evaluate("document.querySelector('iframe') === null")


def save_screenshot(browser: Chromium, path: Path) -> None:
    """The UI with the whole page in its frame: the window made as tall as the page."""
    height = browser.evaluate("document.querySelector('iframe').contentDocument.documentElement.scrollHeight")
    browser.call("Emulation.setDeviceMetricsOverride", width=browser.width, height=int(height) + 40, deviceScaleFactor=1, mobile=False)
    browser.wait_for("document.querySelector('iframe').getBoundingClientRect().height >= "
                     "document.querySelector('iframe').contentDocument.documentElement.scrollHeight")
    path.parent.mkdir(parents=True, exist_ok=True)
    browser.screenshot(path)
