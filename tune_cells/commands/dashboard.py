"""`tune-cells dashboard`: optuna-dashboard on the live Optuna journal of a workdir's searches."""

from __future__ import annotations

import click

from tune_cells.commands.options import workdir_option
from tune_cells.errors import UserInputError


@click.command("dashboard")
@workdir_option
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address; keep loopback unless you mean it.")
def command(workdir, port, host):
    """Open optuna-dashboard on the searches of --workdir, live: one study per search, its trials'
    learning curves as they train (read from the Optuna journal each search writes)."""
    from tune_cells.listening import check_listen
    from tune_cells.paths import WorkDir

    check_listen(host, port)
    journal = WorkDir.at(workdir).optuna_journal
    if not journal.is_file():
        raise UserInputError(f"no Optuna journal at {journal}: run `tune-cells search TASK --workdir "
                             f"{WorkDir.at(workdir).root}` first (it writes one as its trials report)")
    try:
        import bottle
        from optuna_dashboard import wsgi
    except ImportError:
        raise RuntimeError("optuna-dashboard is not installed: reinstall tune-cells (./run setup)") from None
    from tune_cells.live_study import open_journal

    storage = open_journal(journal)
    if not storage.get_all_studies():  # (Optuna skips lines that are no journal entries)
        raise UserInputError(f"{journal}: holds no Optuna study (not a journal that a search wrote?)")
    click.echo(f"Optuna dashboard on http://{host}:{port} for {journal} (Ctrl-C stops it)")
    # optuna-dashboard's own server (bottle + wsgiref), without a banner or a line per request
    bottle.run(wsgi(storage), host=host, port=port, quiet=True)
