"""`tune-cells export`: a registered model as ONNX or TorchScript, with its preprocessing contract,
written only after a parity check against the registered model (tune_cells.exporting)."""

from __future__ import annotations

import click

from tune_cells.commands.opening import open_registered_model
from tune_cells.commands.options import tracking_option, workdir_option
from tune_cells.errors import UserInputError
from tune_cells.logged_runs import LoggedVersion


@click.command("export")
@click.argument("task")
@click.option("--format", "format_name", type=click.Choice(["onnx", "torchscript"]), default="onnx",
              show_default=True, help="ONNX (opset 18, any batch size) or a TorchScript module (torch.jit).")
@click.option("--output", type=click.Path(path_type=str), default=None,  # as typed: see check_new_file
              help="File to write [default: WORKDIR/exports/MODEL-vVERSION.onnx or .pt]; the contract goes to "
                   "FILE.json beside it. Existing files are not overwritten.")
@click.option("--model-uri", default=None, help="Model to export [default: models:/tune-cells-TASK@champion].")
@workdir_option
@tracking_option
def command(task, format_name, output, model_uri, workdir, tracking_uri):
    """Export TASK's registered model (the champion by default) as one graph from normalised images to
    probabilities, with its preprocessing contract (sizes, normalisation, classes; for segmentation the
    tiling and thresholds) in a JSON beside it. Nothing is written unless the graph, fed as the
    contract says, matches the registered model on the model's test images (max |difference| <= 1e-4)."""
    from tune_cells.exporting import FORMATS, TORCHSCRIPT, ExportedModel, check_output, export_checked

    opened = open_registered_model(task, workdir, tracking_uri, model_uri)  # writes exports/ and the read log
    spec, version = opened.task, opened.version
    export_format = FORMATS[format_name]
    default = opened.workdir.root / "exports" / f"{version.name}-v{version.version}{export_format.suffix}"
    if output is None and (default.exists() or default.is_symlink()):  # not an --output the user gave
        raise UserInputError(f"{default}: version {version.version} is already exported as {export_format.name} "
                             "(not overwritten); give --output for another copy")
    output = check_output(output or default)

    predictor = opened.tracker.load_classifier(opened.uri)
    plan = spec.kind.export_plan(predictor)
    images, source = parity_images(spec, opened.tracker, version, opened.workdir, plan, predictor.spec.channels,
                                   predictor.spec.store_size)
    click.echo(f"Exporting {opened.uri} (version {version.version}) as {export_format.name}; checking parity on "
               f"{source}")
    model = ExportedModel(opened.uri, version.name, str(version.version), spec.name, spec.kind.name,
                          LoggedVersion.of(version).search_run_id)
    result = export_checked(plan, export_format, images, output, model, source)
    parity = result.parity
    checked = ", ".join(f"{k} {v:.2g}" for k, v in parity.details.items())
    click.echo(f"Parity: max |probability difference| {parity.max_abs_diff:.3g} (tolerance {parity.tolerance:g}; "
               f"{checked}) over {parity.images} images, {parity.runtime} against the registered model")
    click.echo("In the graph: " + "; ".join(plan.in_graph()))
    click.echo("Not in the graph (the JSON says how): " + "; ".join(plan.not_in_graph()))
    if export_format is TORCHSCRIPT:
        click.echo("Note: PyTorch deprecates TorchScript (torch.jit); --format onnx is the longer-lived choice.")
    click.echo(f"Wrote {result.path}\n  and its contract {result.contract_path}")


def parity_images(task, tracker, version, workdir, plan, channels: int, size: int) -> tuple[list, str]:
    """Up to `plan.max_images` images of the test part of the split the registered `version` was
    trained beside, decoded as the registered model decodes them (the read is logged), and a few
    words naming them."""
    from dataclasses import replace

    from tune_cells.analysis.evaluation import model_split
    from tune_cells.data.reader import SplitReader

    if "data_root" not in version.tags:
        raise UserInputError(f"models:/{version.name}/{version.version} has no data_root tag: which images to check "
                             "parity on is unknown")
    index, split = model_split(task, tracker, LoggedVersion.of(version), workdir)
    paths = split.parts["test"][: plan.max_images]
    if not paths:
        raise RuntimeError(f"split {split.path.name} has no test images to check parity on")
    reader = SplitReader(index, replace(split, parts={"test": paths}), channels, size, workdir)
    images = plan.load_images(reader, "test", "export parity")
    return images, f"{len(paths)} test images of split {split.path.name} (sha256 {split.sha256[:12]})"
