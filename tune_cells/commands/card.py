"""`tune-cells card`: the model card of a registered version, as its evaluation wrote it."""

from __future__ import annotations

import click

from tune_cells.commands.opening import open_registered_model
from tune_cells.commands.options import tracking_option, workdir_option
from tune_cells.errors import UserInputError


@click.command("card")
@click.argument("task")
@click.option("--version", default=None, metavar="N", help="Version of tune-cells-TASK (else tune-cells-TASK-demo) [default: "
                                              "the champion].")
@click.option("--model-uri", default=None, help="Model as models:/NAME/VERSION or models:/NAME@ALIAS.")
@click.option("--output", type=click.Path(path_type=str), default=None,  # as typed: see check_new_file
              help="Also write the card to this new file.")
@workdir_option
@tracking_option
def command(task, version, model_uri, output, workdir, tracking_uri):
    """Print the model card of TASK's champion (or --version N, or --model-uri): Markdown, written with
    the version's latest evaluation on its test part."""
    from tune_cells.analysis.model_card import find_card
    from tune_cells.output_files import check_new_file

    if output is not None:
        output = check_new_file(output)  # a card never replaces a file
    model = open_registered_model(task, workdir, tracking_uri, model_uri, version, writes=False)  # reads only
    text = find_card(model.tracker, model.version)
    if output is not None:
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            with open(output, "x") as file:  # never replaces a file, also one made since the check
                file.write(text)
        except FileExistsError:
            raise UserInputError(f"--output {output}: already exists (not overwritten)") from None
        except OSError as exc:
            raise UserInputError(f"--output {output}: cannot write ({exc.strerror})") from None
    click.echo(text, nl=False)
