"""`tune-cells serve` against hostile input (issue #18): decompression bombs, special files in the
`path` column, a foreign Host header, oversized requests, a failing row, a changed model code file,
bodies its parser chokes on, requests that outlast the server's timeout.

Three real servers started by `tune-cells serve` (in parallel, once for the module) serve the
format-1 fixture model, registered as is in a fresh store (no training): `default` without
`--allow-path-root`, `confined` with it, `timed` with a 1-second request timeout (on ::1 where
this machine has IPv6 loopback).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
from test_model_format1 import IMAGE_PATHS, MODEL, assert_expected, encoded_images

from conftest import cli_subprocess, png_of_zeros, stop_process_group, store_client
from test_cluster_search import free_port

pytestmark = pytest.mark.slow

NAME, TAMPERED = "tune-cells-fixture", "tune-cells-tampered"
MAX_RSS_GROWTH_MB = 100


def register(client, experiment_id: str, name: str, folder: Path) -> None:
    """Upload a logged model folder as a run's `model` artifact (as is, not re-logged) and register
    it as version 1 of `name`, a nuclei model."""
    run = client.create_run(experiment_id, run_name=name)
    client.log_artifacts(run.info.run_id, str(folder), "model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model(name)
    client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_model_version_tag(name, "1", "task", "nuclei")


def start_server(root: Path, label: str, *flags, host: str = "127.0.0.1", timeout: int | None = None) -> dict:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if timeout is not None:
        env["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] = str(timeout)
    log_path = root / f"{label}.log"
    with open(log_path, "w") as log:  # a file, not a pipe nobody reads: access logs would fill it
        server = subprocess.Popen([sys.executable, "-m", "tune_cells", "serve", "nuclei", "--workdir", root / "work",
                                   "--model-uri", f"models:/{NAME}/1", "--port", str(port), "--host", host, *flags],
                                  cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return {"server": server, "port": port, "host": host, "log": log_path}


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def wait_until_ready(served: dict, seconds: int = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if served["server"].poll() is not None:
            pytest.fail(f"server exited: {served['log'].read_text()[-2000:]}")
        try:
            if request(served, "GET", "/ping", timeout=2)[0] == 200:
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"server did not answer /ping within {seconds} s: {served['log'].read_text()[-2000:]}")


def request(served: dict, method: str, path: str, body: bytes | str | None = None, headers: dict | None = None,
            timeout: float = 60) -> tuple[int, str]:
    connection = http.client.HTTPConnection(served["host"], served["port"], timeout=timeout)
    try:
        data = body.encode() if isinstance(body, str) else body
        sent = {name: value for name, value in {"Content-Type": "application/json", **(headers or {})}.items()
                if value is not None}  # None: that header is not sent
        connection.request(method, path, body=data, headers=sent)
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


def invoke(served: dict, document: dict) -> tuple[int, dict]:
    status, text = request(served, "POST", "/invocations", json.dumps(document))
    return status, json.loads(text)


def images_body(encoded: list[str]) -> dict:
    return {"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]}}


def paths_body(paths: list) -> dict:
    return {"dataframe_records": [{"path": str(p)} for p in paths]}


def assert_one_line_refusal(status: int, answer: dict, expect: str) -> str:
    assert status == 400, answer
    assert not answer.get("stack_trace"), answer
    assert set(answer) == {"error_code", "message"}, answer
    message = answer["message"]
    assert "\n" not in message and expect in message, message
    return message


def assert_json_error(status: int, text: str, expect_status: int, expect: str) -> dict:
    """An error answer in the one shape every error of the server has."""
    answer = json.loads(text)
    assert status == expect_status and set(answer) == {"error_code", "message"}, (status, text)
    assert "\n" not in answer["message"] and expect in answer["message"], answer
    return answer


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    (root / "work").mkdir()
    client = store_client(root / "work" / "mlflow.db")
    experiment_id = client.create_experiment("nuclei", artifact_location=(root / "work" / "mlartifacts").as_uri())
    register(client, experiment_id, NAME, MODEL)
    tampered = root / "tampered-model"
    shutil.copytree(MODEL, tampered)
    marker = root / "stored-code-ran"
    code = tampered / "mlflow_model_code.py"
    code.write_text(code.read_text() + f"\nopen({str(marker)!r}, 'w').close()\n")
    register(client, experiment_id, TAMPERED, tampered)

    allowed = root / "allowed"
    (allowed / "folder").mkdir(parents=True)
    shutil.copy(IMAGE_PATHS[0], allowed / "good.png")
    os.mkfifo(allowed / "fifo")
    (allowed / "link-to-fifo").symlink_to(allowed / "fifo")
    (allowed / "link-outside").symlink_to(IMAGE_PATHS[1])  # an image, but outside the root
    started = {"default": start_server(root, "default"),
               "confined": start_server(root, "confined", "--allow-path-root", allowed, "--allowed-host", "FD00::5",
                                        "--allowed-host", "Cells.Lab."),
               "timed": start_server(root, "timed", host="::1" if ipv6_loopback() else "127.0.0.1", timeout=1)}
    try:
        for label, served in started.items():
            wait_until_ready(served)
            if label != "timed":  # its one second could be too short for a cold first prediction
                status, answer = invoke(served, images_body(encoded_images()))  # warm: the first prediction
                assert status == 200, answer
                assert_expected(pd.DataFrame(answer["predictions"]))
        yield {**started, "root": root, "allowed": allowed, "marker": marker}
    finally:
        for served in started.values():
            stop_process_group(served["server"])


@pytest.mark.parametrize("width, height, bit_depth", [(20000, 20000, 1), (13000, 13000, 16)],
                         ids=["400-megapixels", "13k-16-bit"])
def test_decompression_bomb_is_refused_from_its_header(servers, width, height, bit_depth):
    served = servers["default"]
    bomb = png_of_zeros(width, height, bit_depth)
    assert len(bomb) < 1 << 20
    before = rss_mb(served["server"].pid)
    started = time.monotonic()
    status, answer = invoke(served, images_body([base64.b64encode(bomb).decode()]))
    elapsed = time.monotonic() - started
    growth = rss_mb(served["server"].pid) - before
    assert_one_line_refusal(status, answer, "row 0 (image): ")
    assert answer["message"].endswith("over the limit of 40 megapixels"), answer
    print(f"{width}x{height} {bit_depth}-bit PNG of {len(bomb) >> 10} KB: 400 in {elapsed:.3f} s, "
          f"server RSS {before:.0f} MB -> +{growth:.1f} MB")
    assert elapsed < 1.0
    assert growth < MAX_RSS_GROWTH_MB


def test_path_column_is_off_without_a_root(servers):
    status, answer = invoke(servers["default"], paths_body([IMAGE_PATHS[0]]))
    assert_one_line_refusal(status, answer, "the path column is off on this server")


def test_every_refused_path_reads_the_same_and_blocks_nothing(servers):
    served, allowed = servers["confined"], servers["allowed"]
    refused = [allowed / "fifo", allowed / "link-to-fifo", allowed / "missing.png", allowed / "folder",
               allowed / "link-outside", allowed / ".." / "work" / "mlflow.db", "../../../../etc/passwd", "/etc/shadow",
               "/nonexistent", "/root", "/dev/zero", "/dev/stdin", f"/proc/{served['server'].pid}/environ"]
    messages = set()
    for _ in range(2):  # more refusals than the server has prediction threads
        for path in refused:
            started = time.monotonic()
            status, answer = invoke(served, paths_body([allowed / "good.png", path]))
            assert time.monotonic() - started < 5, path
            messages.add(assert_one_line_refusal(status, answer, "row 1 (path): "))
    assert len(messages) == 1, messages  # missing, folder, FIFO, device, outside: one text

    status, answer = invoke(served, paths_body(["good.png", allowed / "good.png"]))  # relative to the root, or absolute
    assert status == 200, answer
    assert len(answer["predictions"]) == 2

    with ThreadPoolExecutor(8) as pool:  # and predictions still run, eight at once
        results = list(pool.map(lambda _: invoke(served, images_body(encoded_images())), range(8)))
    for status, answer in results:
        assert status == 200, answer
        assert_expected(pd.DataFrame(answer["predictions"]))


def test_a_foreign_host_header_is_refused(servers):
    served = servers["default"]
    for host in ("evil.example", f"evil.example:{served['port']}", "192.168.1.1"):
        status, text = request(served, "GET", "/ping", headers={"Host": host})
        assert_json_error(status, text, 400, "Invalid host header")
        status, text = request(served, "POST", "/invocations", json.dumps(images_body(encoded_images()[:1])),
                               headers={"Host": host})
        assert_json_error(status, text, 400, "Invalid host header")
    for host in (f"127.0.0.1:{served['port']}", f"localhost:{served['port']}", "localhost"):
        assert request(served, "GET", "/ping", headers={"Host": host})[0] == 200, host
    # --allowed-host as given (FD00::5, Cells.Lab.) against a Host header as a client spells it
    served = servers["confined"]
    for host in (f"[fd00::5]:{served['port']}", "cells.lab", f"CELLS.LAB.:{served['port']}"):
        assert request(served, "GET", "/ping", headers={"Host": host})[0] == 200, host
    for host in ("fd00::5", "[fd00::6]", "cells.lab.evil.example"):
        assert_json_error(*request(served, "GET", "/ping", headers={"Host": host}), 400, "Invalid host header")


def test_rows_and_body_size_are_capped(servers):
    from tune_cells.pyfunc import MAX_ROWS_PER_REQUEST
    from tune_cells.serving import MAX_REQUEST_BYTES

    served = servers["default"]
    too_many = encoded_images()[:1] * (MAX_ROWS_PER_REQUEST + 1)
    status, answer = invoke(served, images_body(too_many))
    assert_one_line_refusal(status, answer, f"{MAX_ROWS_PER_REQUEST + 1} rows: at most {MAX_ROWS_PER_REQUEST}")

    connection = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=30)
    try:  # declared over the limit: refused before a byte of the body is read
        connection.putrequest("POST", "/invocations")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(MAX_REQUEST_BYTES + 1))
        connection.endheaders()
        response = connection.getresponse()
        status, answer = response.status, json.loads(response.read())
    finally:
        connection.close()
    assert status == 413 and "\n" not in answer["message"] and "request body over" in answer["message"], answer
    assert request(served, "GET", "/ping")[0] == 200


def test_a_failing_row_is_one_line_naming_it(servers):
    served = servers["default"]
    rows = encoded_images()[:2] + [base64.b64encode(b"not an image").decode()]
    status, answer = invoke(served, images_body(rows))
    message = assert_one_line_refusal(status, answer, "row 2 (image): not a decodable image")
    assert message == "row 2 (image): not a decodable image (UnidentifiedImageError)"
    # A format Pillow knows but the server does not decode (GIF), and input MLflow itself refuses.
    gif = base64.b64encode(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;").decode()
    assert_one_line_refusal(*invoke(served, images_body([gif])), "row 0 (image): not a decodable image")
    status, answer = invoke(served, {"dataframe_split": {"columns": ["image"], "data": [[{"a": 1}]]}})
    assert 400 <= status < 500 and not answer.get("stack_trace") and "\n" not in answer["message"], answer
    # Bytes that are not Parquet: an exception MLflow's parser does not expect (it used to return its trace).
    status, text = request(served, "POST", "/invocations", b"\x00 not parquet",
                           headers={"Content-Type": "application/vnd.apache.parquet"})
    answer = json.loads(text)
    assert status == 400 and set(answer) == {"error_code", "message"} and "\n" not in answer["message"], answer
    assert "Traceback" not in text


def test_every_error_answer_is_one_line_of_json_and_the_server_lives_on(servers):
    served = servers["default"]
    one_image = json.dumps(images_body(encoded_images()[:1]))
    # No Content-Type: MLflow's parser failed on it (500, plain text).
    status, text = request(served, "POST", "/invocations", one_image, headers={"Content-Type": None})
    assert_json_error(status, text, 415, "no Content-Type header: send application/json")
    status, text = request(served, "POST", "/invocations", one_image, headers={"Content-Type": "image/png"})
    assert_json_error(status, text, 415, "Got 'image/png'")
    # JSON that Python's parser raises on (500, plain text): the client's fault.
    deep = "[" * 100_000 + "]" * 100_000
    status, text = request(served, "POST", "/invocations", deep)
    assert_json_error(status, text, 400, "the request body could not be read (RecursionError")
    long_integer = '{"dataframe_split": {"columns": ["image"], "data": [[' + "9" * 5000 + "]]}}"
    status, text = request(served, "POST", "/invocations", long_integer)
    assert_json_error(status, text, 400, "could not be read (ValueError: Exceeds the limit (4300 digits)")
    status, text = request(served, "GET", "/nowhere")
    assert_json_error(status, text, 404, "Not Found")
    assert request(served, "POST", "/invocations", one_image)[0] == 200


def test_a_request_over_the_pixel_budget_is_refused_before_any_decoding(servers):
    from tune_cells.pyfunc import MAX_PIXELS_PER_REQUEST

    side = 6324  # 40 MP, within the limit per image, and about a second of one core to decode
    count = MAX_PIXELS_PER_REQUEST // side**2 + 1
    started = time.monotonic()
    status, answer = invoke(servers["default"], images_body([base64.b64encode(png_of_zeros(side, side, 8)).decode()]
                                                            * count))
    assert_one_line_refusal(status, answer, f"row {count - 1} (image): the request's images pass "
                                            f"{MAX_PIXELS_PER_REQUEST // 10**6} megapixels in all")
    assert time.monotonic() - started < 2  # read from the headers: no image decoded


def test_work_on_a_request_stops_at_the_server_timeout(servers):
    from tune_cells.pyfunc import MAX_ROWS_PER_REQUEST

    served = servers["timed"]
    bind = f"[{served['host']}]" if ":" in served["host"] else served["host"]  # the banner's URL brackets IPv6
    assert f"on http://{bind}:{served['port']}/invocations" in served["log"].read_text()
    # 10 MP rows in one line of pixels: about half a second each to decode, half a minute in all.
    rows = [base64.b64encode(png_of_zeros(9_999_999, 1, 16)).decode()] * MAX_ROWS_PER_REQUEST
    started = time.monotonic()
    status, text = request(served, "POST", "/invocations", json.dumps(images_body(rows)))
    answer = assert_json_error(status, text, 504, "exceeded limit")
    # On time: the old server's decoding thread starved its event loop, so the 504 came at the end.
    assert answer["error_code"] == "DEADLINE_EXCEEDED" and time.monotonic() - started < 6
    # The row being decoded at the timeout finishes, and no other starts: the old server went on.
    deadline, idle = time.monotonic() + 5, False
    while not idle and time.monotonic() < deadline:
        before = cpu_seconds(served["server"].pid)
        time.sleep(0.5)
        idle = cpu_seconds(served["server"].pid) - before < 0.05
    assert idle, "the server kept working on a request its client was told had timed out"
    assert "stopped after decoding" in served["log"].read_text()


def test_a_model_with_changed_stored_code_is_not_served_and_its_code_never_runs(servers):
    root, marker = servers["root"], servers["marker"]
    refused = cli_subprocess(["serve", "nuclei", "--workdir", root / "work", "--model-uri", f"models:/{TAMPERED}/1",
                              "--port", free_port()], cwd=root, timeout=120)
    assert refused.code == 2, refused.err[-2000:]
    assert refused.err.strip().count("\n") == 0 and "mlflow_model_code.py" in refused.err, refused.err
    output = root / "tampered.csv"
    predicted = cli_subprocess(["predict", "nuclei", *IMAGE_PATHS, "--workdir", root / "work", "--model-uri",
                                f"models:/{TAMPERED}/1", "--output", output], cwd=root, timeout=120)
    assert predicted.code == 0, predicted.err[-2000:]
    assert_expected(pd.read_csv(output))  # predict rebuilt the network from spec and weights
    assert not marker.exists()  # ... and neither command ran the stored code file
