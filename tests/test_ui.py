"""The real UI: `dagster-webserver` on 127.0.0.1 with a temporary DAGSTER_HOME and DISTILL_HOME.
GraphQL reads the asset graph and the round partitions and launches one round; headless Chromium
(Debian's `chromium`, driven by Playwright, no browser download) opens the asset graph and saves a
screenshot under the test's tmp_path and `.artifacts/`."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import copy_store
from test_rounds import TINY_ROUND

ROOT = Path(__file__).parent.parent
ARTIFACTS = ROOT / ".artifacts"
ROUND_ASSETS = ["student_rollouts", "teacher_feedback", "student_checkpoint", "round_eval"]
INSTANCE_YAML = """telemetry:
  enabled: false
run_coordinator:
  module: dagster.core.run_coordinator
  class: DefaultRunCoordinator
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def graphql(url: str, query: str, variables: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"{url}/graphql", data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.loads(response.read())
    assert "errors" not in body, body
    return body["data"]


@pytest.fixture(scope="module")
def webserver(tmp_path_factory, tiny_offline_store):
    """A copy of the tiny offline store in a fresh instance, then the webserver on it."""
    home = tmp_path_factory.mktemp("ui")
    env = {**os.environ, "DISTILL_HOME": str(home / "distill"), "DAGSTER_HOME": str(home / "dagster")}
    (home / "dagster").mkdir()
    (home / "dagster" / "dagster.yaml").write_text(INSTANCE_YAML)
    copy_store(tiny_offline_store, home / "distill")
    port = free_port()
    log = open(home / "webserver.log", "w")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-w", "workspace.yaml"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/server_info", timeout=5)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (home / "webserver.log").read_text()[-3000:]
                time.sleep(1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def repository(url: str) -> dict:
    data = graphql(url, "{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }")
    node = data["repositoriesOrError"]["nodes"][0]
    return {"repositoryName": node["name"], "repositoryLocationName": node["location"]["name"]}


def test_graphql_reads_the_round_graph_and_launches_a_round(webserver):
    selector = repository(webserver)
    nodes = graphql(webserver, "{ assetNodes { assetKey { path } groupName isPartitioned } }")["assetNodes"]
    groups = {"/".join(n["assetKey"]["path"]): (n["groupName"], n["isPartitioned"]) for n in nodes}
    assert all(groups[name] == ("rounds", True) for name in [*ROUND_ASSETS, "round_judgments", "round_pairs"])
    assert groups["offline_student"] == ("students", False)
    assert all(groups[name] == ("feedback", False) for name in ["student_samples", "teacher_judgments", "preference_pairs",
                                                                "preference_student"])
    jobs = graphql(webserver, "query($selector: RepositorySelector!) { repositoryOrError(repositorySelector: $selector) "
                              "{ ... on Repository { jobs { name } } } }", {"selector": selector})["repositoryOrError"]["jobs"]
    assert {"distill_feedback", "distill_round_preference"} <= {job["name"] for job in jobs}

    added = graphql(webserver, """
        mutation($selector: RepositorySelector!) {
          addDynamicPartition(repositorySelector: $selector, partitionsDefName: "rounds", partitionKey: "r001") {
            __typename ... on AddDynamicPartitionSuccess { partitionKey } ... on PythonError { message } } }""",
        {"selector": selector})["addDynamicPartition"]
    assert added == {"__typename": "AddDynamicPartitionSuccess", "partitionKey": "r001"}
    keys = graphql(webserver, '{ assetNodeOrError(assetKey: {path: ["round_eval"]}) { ... on AssetNode { partitionKeys } } }')
    assert keys["assetNodeOrError"]["partitionKeys"] == ["r001"]

    launched = graphql(webserver, """
        mutation($params: ExecutionParams!) {
          launchRun(executionParams: $params) {
            __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
            ... on RunConfigValidationInvalid { errors { message } } } }""",
        {"params": {
            "selector": {**selector, "jobName": "distill_round"},
            "runConfigData": {"ops": {name: {"config": config} for name, config in TINY_ROUND.items()}},
            "executionMetadata": {"tags": [{"key": "dagster/partition", "value": "r001"}]},
        }})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    deadline, status = time.monotonic() + 600, None
    while time.monotonic() < deadline:
        status = graphql(webserver, "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }", {"id": run_id})
        status = status["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            break
        time.sleep(0.5)
    assert status == "SUCCESS"
    materialized = graphql(webserver, """{ assetNodeOrError(assetKey: {path: ["round_eval"]}) { ... on AssetNode {
        assetMaterializations(partitions: ["r001"]) { partition runId } } } }""")
    assert materialized["assetNodeOrError"]["assetMaterializations"] == [{"partition": "r001", "runId": run_id}]


def test_browser_sees_the_round_assets(webserver, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    executable = shutil.which("chromium")
    assert executable, "Debian's chromium is missing: `make install` installs it (apt-get install -y chromium)"
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(
            executable_path=executable,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            location = repository(webserver)["repositoryLocationName"]
            page.goto(f"{webserver}/locations/{location}/asset-groups/rounds", wait_until="domcontentloaded")
            for name in ROUND_ASSETS:
                page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
            skip = page.get_by_role("button", name="Skip")  # the first-visit community dialog
            if skip.count():
                skip.click()
            page.wait_for_timeout(1000)
            screenshot = tmp_path / "asset-graph.png"
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(screenshot, ARTIFACTS / "asset-graph.png")
