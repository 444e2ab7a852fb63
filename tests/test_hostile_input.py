"""The pieces behind a hardened server, in-process and fast (issue #18): the header pixel limit and
the decoder list, the `path` confinement, the pyfunc's serving rules and one-line errors, the
model-code check. tests/test_serve_hostile.py runs the same cases against the real server."""

from __future__ import annotations

import base64
import io
import json
import os
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image, UnidentifiedImageError
from test_model_format1 import IMAGE_PATHS, MODEL, assert_expected

from tune_cells.data.images import MAX_IMAGE_PIXELS, ImageTooLarge, decode_image, open_image, store_array
from tune_cells.errors import UserInputError
from tune_cells.path_access import PATH_REFUSED, PathRefused, allowed_root, open_under_root

from conftest import png_of_zeros


@pytest.fixture(scope="module")
def predictor():
    from tune_cells.kinds import load_predictor

    return load_predictor(MODEL / "artifacts" / "checkpoint")


def test_pixel_limit_is_read_from_the_header_before_decoding():
    bomb = png_of_zeros(8000, 8000, 1)  # 64 MP: over the limit, under Pillow's own
    assert 8000 * 8000 > MAX_IMAGE_PIXELS
    with pytest.raises(ImageTooLarge, match="8000x8000 pixels, over the limit of 40 megapixels"):
        open_image(io.BytesIO(bomb))
    with pytest.raises(ImageTooLarge, match="over the limit of 40 megapixels"):  # past Pillow's: its check first
        open_image(io.BytesIO(png_of_zeros(20000, 20000, 1)))
    with open_image(io.BytesIO(png_of_zeros(1392, 1040, 8))) as lung_field:  # the largest task images fit
        assert lung_field.size == (1392, 1040)


def test_only_the_listed_formats_are_decoded(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.gif")
    with pytest.raises(UnidentifiedImageError):
        decode_image(tmp_path / "x.gif", 3, 8)
    for suffix in ("png", "jpg", "tif", "bmp"):
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / f"x.{suffix}")
        assert decode_image(tmp_path / f"x.{suffix}", 3, 8).shape == (8, 8, 3)


def test_16_bit_rescaling_is_unchanged_by_working_in_bands():
    pixels = np.random.default_rng(0).integers(0, 4000, size=(1100, 700), dtype=np.uint16)
    image = Image.fromarray(pixels)
    as_before = np.asarray(image, dtype=np.float32)  # the former whole-image formula
    expected = Image.fromarray((as_before / float(as_before.max()) * 255).astype(np.uint8)).convert("RGB")
    expected = np.asarray(expected.resize((64, 64), Image.Resampling.BILINEAR, reducing_gap=None))
    assert np.array_equal(store_array(image, 3, 64), expected)


def test_every_refused_path_reads_the_same(tmp_path):
    root = tmp_path / "root"
    (root / "folder").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "good.png")
    os.mkfifo(root / "fifo")
    (root / "link-to-fifo").symlink_to(root / "fifo")
    (tmp_path / "outside.png").write_bytes((root / "good.png").read_bytes())
    (root / "link-outside").symlink_to(tmp_path / "outside.png")
    resolved = allowed_root(root)
    refused = ["fifo", "link-to-fifo", "missing.png", "folder", "link-outside", "../outside.png",
               str(tmp_path / "outside.png"), "/etc/passwd", "/dev/zero", "good.png\0", "", None, 3.5]
    outcome = {}

    def attempt_all():  # in a thread: a blocking open would hang the test, not fail it
        for value in refused:
            try:
                open_under_root(value, resolved).close()
                outcome[repr(value)] = "opened"
            except PathRefused as exc:
                outcome[repr(value)] = str(exc)

    worker = threading.Thread(target=attempt_all, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "open_under_root blocked"
    assert outcome == {repr(value): PATH_REFUSED for value in refused}
    for value in ("good.png", str(root / "good.png"), str(root / "folder" / ".." / "good.png")):
        with open_under_root(value, resolved) as file:
            assert file.read(4) == b"\x89PNG"


def test_the_pyfunc_serving_rules(predictor, tmp_path, monkeypatch):
    from tune_cells.pyfunc import MAX_ROWS_PER_REQUEST, MLFLOW_SERVING_FLAG, TuneCellsModel

    paths = pd.DataFrame({"path": [str(p) for p in IMAGE_PATHS]})
    assert_expected(TuneCellsModel(predictor).predict(None, paths))  # Python use: any local file
    with pytest.raises(MlflowException, match="the path column is off on this server"):
        TuneCellsModel(predictor, serving=True).predict(None, paths)
    monkeypatch.setenv(MLFLOW_SERVING_FLAG, "true")  # inside `mlflow models serve`
    with pytest.raises(MlflowException, match="the path column is off on this server"):
        TuneCellsModel(predictor).predict(None, paths)
    monkeypatch.delenv(MLFLOW_SERVING_FLAG)

    confined = TuneCellsModel(predictor, serving=True, path_root=allowed_root(IMAGE_PATHS[0].parent))
    assert_expected(confined.predict(None, pd.DataFrame({"path": [p.name for p in IMAGE_PATHS]})))
    with pytest.raises(MlflowException) as refused:
        confined.predict(None, pd.DataFrame({"path": [IMAGE_PATHS[0].name, "/etc/passwd"]}))
    assert refused.value.message == f"row 1 (path): {PATH_REFUSED}"

    many = pd.DataFrame({"path": [str(IMAGE_PATHS[0])] * (MAX_ROWS_PER_REQUEST + 1)})
    assert len(TuneCellsModel(predictor).predict(None, many)) == MAX_ROWS_PER_REQUEST + 1  # Python use: no cap
    with pytest.raises(MlflowException, match=f"rows: at most {MAX_ROWS_PER_REQUEST} per request"):
        confined.predict(None, many)


def test_every_failure_in_predict_is_one_line(predictor, monkeypatch):
    from tune_cells.pyfunc import TuneCellsModel

    model = TuneCellsModel(predictor, serving=True)
    good = base64.b64encode(IMAGE_PATHS[0].read_bytes()).decode()
    cases = [([good, "aGVsbG8="], "row 1 (image): not a decodable image (UnidentifiedImageError)"),
             (["%%% not base64"], "row 0 (image): not a decodable image (ValueError)"),
             ([good, good, None], "row 2 (image): not a decodable image (ValueError)"),
             ([base64.b64encode(png_of_zeros(8000, 8000, 1)).decode()],
              "row 0 (image): 8000x8000 pixels, over the limit of 40 megapixels")]
    for rows, message in cases:
        with pytest.raises(MlflowException) as failed:
            model.predict(None, pd.DataFrame({"image": rows}))
        assert (failed.value.error_code, failed.value.message) == ("INVALID_PARAMETER_VALUE", message)

    def broken(images):
        raise RuntimeError("a\nmultiline\ninternal error")

    monkeypatch.setattr(predictor, "predict_table", broken)
    with pytest.raises(MlflowException) as failed:
        model.predict(None, pd.DataFrame({"image": [good]}))
    assert failed.value.error_code == "INTERNAL_ERROR"  # the network failing is the server's fault: 500
    assert failed.value.message == "prediction failed (RuntimeError); the server log has the details"


def test_error_answers_are_cut_to_one_line():
    from tune_cells.serving import one_line_error

    def answer(status: int, body: bytes) -> dict:
        return json.loads(one_line_error(status, body))

    prefixed = {"error_code": "INVALID_PARAMETER_VALUE",
                "message": "Failed to predict data '     image\n0  aGVsbG8='. \nError: row 0 (image): not a decodable image"}
    assert answer(400, json.dumps(prefixed).encode()) == {
        "error_code": "INVALID_PARAMETER_VALUE", "message": "row 0 (image): not a decodable image"}
    crashed = {"error_code": "BAD_REQUEST", "message": "Encountered an unexpected error.\nmore",
               "stack_trace": "Traceback (most recent call last):\n  File ..."}
    assert answer(400, json.dumps(crashed).encode()) == {"error_code": "BAD_REQUEST",
                                                         "message": "Encountered an unexpected error."}
    multiline = {"error_code": "BAD_REQUEST", "message": "Invalid input.\nInput: \n{not json"}
    assert answer(400, json.dumps(multiline).encode())["message"] == "Invalid input."
    # Plain text (MLflow's timeout, the Host check) and FastAPI's {"detail"} get the same shape.
    assert answer(504, b"Request processing time exceeded limit") == {
        "error_code": "DEADLINE_EXCEEDED", "message": "Request processing time exceeded limit"}
    assert answer(400, b"Invalid host header") == {"error_code": "BAD_REQUEST", "message": "Invalid host header"}
    assert answer(404, b'{"detail":"Not Found"}') == {"error_code": "ENDPOINT_NOT_FOUND", "message": "Not Found"}
    assert answer(500, b"") == {"error_code": "INTERNAL_ERROR", "message": "Internal Server Error"}


def test_a_model_whose_stored_code_differs_is_refused(tmp_path):
    import shutil

    from tune_cells.serving import check_model_code

    check_model_code(MODEL, "models:/fixture/1")  # the format-1 fixture's file is this package's
    changed = Path(shutil.copytree(MODEL, tmp_path / "model"))
    (changed / "mlflow_model_code.py").write_text((MODEL / "mlflow_model_code.py").read_text() + "\nprint(1)\n")
    with pytest.raises(UserInputError, match="mlflow_model_code.py is missing or differs"):
        check_model_code(changed, "models:/fixture/2")
    (changed / "mlflow_model_code.py").unlink()
    with pytest.raises(UserInputError, match="mlflow_model_code.py is missing or differs"):
        check_model_code(changed, "models:/fixture/2")


def test_host_names_the_server_answers():
    from tune_cells.serving import answered_hosts

    assert answered_hosts("127.0.0.1") == ["127.0.0.1", "localhost", "[::1]"]
    assert answered_hosts("::1") == ["127.0.0.1", "localhost", "[::1]"]
    assert answered_hosts("10.0.0.5") == ["127.0.0.1", "localhost", "[::1]", "10.0.0.5"]
    assert answered_hosts("0.0.0.0", ("cells.lab",)) == ["127.0.0.1", "localhost", "[::1]", "cells.lab"]
    assert answered_hosts("fe80::1") == ["127.0.0.1", "localhost", "[::1]", "[fe80::1]"]
    # --allowed-host as a Host header spells it: IPv6 bracketed, names in lower case, no FQDN dot
    assert answered_hosts("0.0.0.0", ("::1", "fd00::0:5", "MyHost", "cells.lab.")) == [
        "127.0.0.1", "localhost", "[::1]", "[fd00::5]", "myhost", "cells.lab"]


def test_the_host_check_compares_names_as_a_host_header_means_them():
    import asyncio

    from tune_cells.serving import HostCheck, answered_hosts

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})

    def status(check, host: str) -> int:
        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "headers": [(b"host", host.encode())]}
        asyncio.run(check(scope, None, send))
        return sent[0]["status"]

    check = HostCheck(app, answered_hosts("127.0.0.1", ("fd00::5", "MyHost", "cells.lab.")))
    for host in ("[fd00::5]:5001", "[FD00:0::5]", "myhost:5001", "MYHOST", "cells.lab", "Cells.Lab.:80", "[::1]:9"):
        assert status(check, host) == 200, host
    for host in ("evil.example", "fd00::5", "[fd00::6]:5001", "myhost.evil", "myhost:port", "", "cells.lab/x"):
        assert status(check, host) == 400, host


def test_the_checkpoint_is_found_where_mlmodel_says(tmp_path):
    import shutil

    from tune_cells.tracking import model_checkpoint

    model = Path(shutil.copytree(MODEL, tmp_path / "model"))
    assert model_checkpoint(model, "m") == model / "artifacts" / "checkpoint"
    (model / "artifacts" / "checkpoint").rename(model / "artifacts" / "checkpoint_tmp_1")  # as a search logs it
    meta = model / "MLmodel"
    meta.write_text(meta.read_text().replace("path: artifacts/checkpoint", "path: artifacts/checkpoint_tmp_1"))
    assert model_checkpoint(model, "m") == model / "artifacts" / "checkpoint_tmp_1"
    meta.write_text(meta.read_text().replace("path: artifacts/checkpoint_tmp_1", "path: ../../.."))
    with pytest.raises(UserInputError, match="m: not a tune-cells model"):
        model_checkpoint(model, "m")


def test_the_size_limit_counts_a_body_that_declares_no_length():
    import asyncio

    from tune_cells.serving import RequestSizeLimit

    def run(chunks: list[bytes], headers: list) -> tuple[list, list]:
        passed, sent = [], []

        async def app(scope, receive, send):
            passed.append(await receive())

        async def receive():
            body = chunks.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(chunks)}

        async def send(message):
            sent.append(message)

        asyncio.run(RequestSizeLimit(app, 10)({"type": "http", "headers": headers}, receive, send))
        return passed, sent

    passed, sent = run([b"12345", b"67890"], [])  # at the limit: passed on whole
    assert passed == [{"type": "http.request", "body": b"1234567890", "more_body": False}] and not sent
    passed, sent = run([b"12345", b"67890", b"1"], [])  # chunked past the limit
    assert not passed and sent[0]["status"] == 413 and b"request body over" in sent[1]["body"]
    passed, sent = run([b""], [(b"content-length", b"11")])  # declared past it: nothing read
    assert not passed and sent[0]["status"] == 413


def test_an_exception_escaping_the_app_is_400_while_reading_the_body_else_500():
    import asyncio

    from tune_cells.serving import OneLineErrors, _PyfuncInterface

    class Model:
        def predict(self, context, data, params):
            raise RuntimeError("the server's own fault")

    async def reading(scope, receive, send):  # as Starlette's ServerErrorMiddleware does: 500 text, then raise
        await send({"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"Internal Server Error"})
        raise RecursionError("maximum recursion depth exceeded while decoding a JSON array")

    async def predicting(scope, receive, send):  # the model reached (in a thread, as MLflow calls it)
        await asyncio.to_thread(_PyfuncInterface(Model()).predict, None)

    def run(app) -> tuple[int, dict]:
        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/invocations", "headers": []}
        asyncio.run(OneLineErrors(app)(scope, None, send))
        assert len(sent) == 2 and (b"content-type", b"application/json") in sent[0]["headers"], sent
        return sent[0]["status"], json.loads(sent[1]["body"])

    assert run(reading) == (400, {"error_code": "BAD_REQUEST", "message": "the request body could not be read "
                                  "(RecursionError: maximum recursion depth exceeded while decoding a JSON array)"})
    assert run(predicting) == (500, {"error_code": "INTERNAL_ERROR",
                                     "message": "internal server error (RuntimeError); the server log has the details"})
