"""`tune-cells export`: a registered model as one ONNX or TorchScript graph, with its preprocessing
contract in a JSON file beside it, written only after a parity check against the registered model.

The graph starts at the normalised float input (N×C×H×W float32) and ends at probabilities: what
the task kind's plan (tune_cells.export_kinds) puts in it, fold members, temperature and test-time
views included. What a graph cannot hold (decoding, resizing, normalising, and for segmentation the
tiling, stitching and thresholds) is written into the contract, and the parity check builds the
graph's input from that contract, so a wrong contract fails the check as a wrong graph does.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from tune_cells.output_files import check_new_file, missing_folders, refuse_existing, remove_folders

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4  # max absolute probability difference to the registered model
ONNX_OPSET = 18  # torch's exporter implements 18 and up; asking for 17 means a lossy down-conversion
INPUT_NAME = "input"
BATCH = "batch"


class ParityFailed(RuntimeError):
    """The exported graph does not compute what the registered model computes (exit 1, nothing written)."""


@dataclass
class ParityReport:
    max_abs_diff: float  # of probabilities, over every image (and every tile) checked
    images: int
    tolerance: float
    source: str  # where the images came from
    runtime: str  # what ran the exported graph
    details: dict[str, float] = field(default_factory=dict)  # per output checked, its own max difference

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.max_abs_diff)) and self.max_abs_diff <= self.tolerance


@dataclass
class TensorSpec:
    name: str
    shape: list[int | str]  # "batch" where any batch size is accepted
    dtype: str
    meaning: str


Runner = Callable[[np.ndarray], dict[str, np.ndarray]]  # the exported graph: input batch -> outputs by name


class ExportPlan(Protocol):
    """What a task kind exports (tune_cells.export_kinds): the graph, its contract, its parity check."""

    graph: torch.nn.Module
    outputs: list[TensorSpec]
    contract: Any  # a dataclass of the kind's preprocessing contract
    max_images: int  # parity images taken from the test part

    def input_spec(self) -> TensorSpec: ...
    def example(self) -> torch.Tensor: ...
    def in_graph(self) -> list[str]: ...
    def not_in_graph(self) -> list[str]: ...
    def preprocessing(self) -> list[str]: ...
    def load_images(self, reader, part: str, purpose: str) -> list: ...
    def parity(self, run: Runner, images: list) -> tuple[float, dict[str, float]]: ...


@dataclass(frozen=True)
class ExportFormat:
    name: str
    suffix: str
    runtime: str

    def write(self, plan: ExportPlan, path: Path) -> None:
        example = plan.example()
        names = [o.name for o in plan.outputs]
        if not log.isEnabledFor(logging.DEBUG):  # the ONNX optimiser logs every rewrite at INFO
            for noisy in ("onnxscript", "onnx_ir"):
                logging.getLogger(noisy).setLevel(logging.WARNING)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
            warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=FutureWarning)
            if self is ONNX:
                torch.onnx.export(plan.graph, (example,), str(path), dynamo=True, opset_version=ONNX_OPSET,
                                  input_names=[INPUT_NAME], output_names=names, external_data=False, verbose=False,
                                  dynamic_shapes=({0: torch.export.Dim(BATCH)},))
            else:
                traced = torch.jit.trace(plan.graph, example)
                torch.jit.save(traced, str(path))

    def runner(self, path: Path, names: list[str]) -> Runner:
        if self is ONNX:
            import onnxruntime

            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            return lambda x: dict(zip(names, session.run(names, {INPUT_NAME: np.ascontiguousarray(x, np.float32)})))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")

        def run(x: np.ndarray) -> dict[str, np.ndarray]:
            with torch.no_grad():
                out = module(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
            out = out if isinstance(out, (tuple, list)) else (out,)
            return {name: tensor.numpy() for name, tensor in zip(names, out)}

        return run


ONNX = ExportFormat("onnx", ".onnx", "onnxruntime (CPUExecutionProvider)")
TORCHSCRIPT = ExportFormat("torchscript", ".pt", "torch.jit.load (CPU)")
FORMATS = {f.name: f for f in (ONNX, TORCHSCRIPT)}


@dataclass
class ExportedModel:
    """Which registered model was exported (the contract's `model` section)."""

    model_uri: str
    name: str
    version: str
    task: str
    kind: str
    search_run_id: str  # the search that registered it ('' if none)


@dataclass
class ExportResult:
    path: Path
    contract_path: Path
    parity: ParityReport
    document: dict


def contract_path(output: Path) -> Path:
    """The contract beside the graph: `<output>.json` (model-v3.onnx -> model-v3.onnx.json)."""
    return output.with_name(output.name + ".json")


def check_output(output: Path) -> Path:
    """The output file, if it and its contract can be written there without replacing anything
    (exit 2 if not)."""
    output = check_new_file(output)
    refuse_existing(contract_path(output))
    return output


def export_checked(plan: ExportPlan, fmt: ExportFormat, images: list, output: Path, model: ExportedModel,
                   source: str) -> ExportResult:
    """Write the graph to a temporary file beside `output`, check it against the registered model
    on `images`, and only then move it and its contract into place. A failed check (ParityFailed)
    leaves nothing behind, not even the folders made for it."""
    output = check_output(output)
    made = missing_folders(output.parent)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = [output.with_name(f".{output.name}.{os.getpid()}.{suffix}.tmp") for suffix in ("graph", "json")]
    try:
        fmt.write(plan, temporary[0])
        names = [o.name for o in plan.outputs]
        worst, details = plan.parity(fmt.runner(temporary[0], names), images)
        report = ParityReport(float(worst), len(images), PARITY_TOLERANCE, source, fmt.runtime,
                              {k: float(v) for k, v in details.items()})
        if not report.passed:
            raise ParityFailed(f"parity check failed: max |probability difference| {report.max_abs_diff:.3g} > "
                               f"{PARITY_TOLERANCE:g} on {report.images} images ({source}); nothing written")
        document = contract_document(plan, fmt, output, model, report)
        temporary[1].write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        check_output(output)  # still free: another command may have written there meanwhile
        os.replace(temporary[0], output)
        os.replace(temporary[1], contract_path(output))  # last: a contract means the graph beside it is whole
        return ExportResult(output, contract_path(output), report, document)
    except BaseException:
        for path in temporary:
            path.unlink(missing_ok=True)
        remove_folders(made)
        raise


def contract_document(plan: ExportPlan, fmt: ExportFormat, output: Path, model: ExportedModel,
                      parity: ParityReport) -> dict:
    from importlib.metadata import version

    exported_with = {"tune_cells": version("tune-cells"), "torch": torch.__version__}
    if fmt is ONNX:
        exported_with |= {"onnx_opset": ONNX_OPSET, "onnx": version("onnx"), "onnxruntime": version("onnxruntime")}
    return {
        "contract_format": 1,
        "model": asdict(model),
        "format": fmt.name,
        "file": output.name,
        "exported_with": exported_with,
        "input": asdict(plan.input_spec()),
        "outputs": [asdict(o) for o in plan.outputs],
        "preprocessing": plan.preprocessing(),
        **asdict(plan.contract),
        "in_graph": plan.in_graph(),
        "not_in_graph": plan.not_in_graph(),
        "parity": asdict(parity),
    }

