"""`tune-cells dashboard`: optuna-dashboard on the live Optuna journal of a workdir's searches.

A read-only view: optuna-dashboard's API would also rename, delete and annotate studies, in the
journal a search appends to (and a DNS-rebinding web page could call it). So only GET and HEAD are
answered, and only for a Host header naming loopback, the bind address or an --allowed-host. One
thread per connection: a browser's idle preconnect must not stall everyone else's requests.
"""

from __future__ import annotations

import logging
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import click

from tune_cells.commands.options import workdir_option
from tune_cells.errors import UserInputError
from tune_cells.listening import header_host

log = logging.getLogger(__name__)

READ_METHODS = ("GET", "HEAD")


@click.command("dashboard")
@workdir_option
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address; keep loopback unless you mean it.")
@click.option("--allowed-host", "allowed_hosts", multiple=True,
              help="A Host header to answer besides loopback and --host (repeatable), e.g. this machine's name.")
def command(workdir, port, host, allowed_hosts):
    """Open optuna-dashboard on the searches of --workdir, live: one study per search, its trials'
    learning curves as they train (read from the Optuna journal each search writes). A read-only view."""
    from tune_cells.listening import base_url, check_listen
    from tune_cells.paths import WorkDir
    from tune_cells.serving import answered_hosts

    hosts = answered_hosts(host, allowed_hosts)  # exit 2 now for a bad --allowed-host
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
    if not storage.get_all_studies():  # (Optuna ignores an unreadable last line: an entry being written)
        raise UserInputError(f"{journal}: holds no Optuna study (not a journal that a search wrote?)")
    click.echo(f"Optuna dashboard on {base_url(host, port)} for {journal} (Ctrl-C stops it)")
    app = ReadOnly(wsgi(storage), hosts)
    # bottle's wsgiref adapter (it binds IPv6 too), threaded, without a banner or a line per request
    bottle.run(app, host=host, port=port, quiet=True, server_class=ThreadingServer, handler_class=QuietHandler)


class ReadOnly:
    """WSGI middleware: 400 for a Host header not in `hosts` (DNS rebinding), 405 for any method
    that is not GET or HEAD (a change to the journal); anything else goes to `app`."""

    def __init__(self, app, hosts: list[str]):
        self.app = app
        self.hosts = set(hosts)  # as answered_hosts spells them: the rule header_host applies

    def __call__(self, environ, start_response):
        if header_host(environ.get("HTTP_HOST", "")) not in self.hosts:
            return _refuse(start_response, "400 Bad Request", "Invalid host header")
        if environ.get("REQUEST_METHOD", "GET").upper() not in READ_METHODS:
            return _refuse(start_response, "405 Method Not Allowed",
                           "tune-cells dashboard is a read-only view of the searches' journal",
                           [("Allow", ", ".join(READ_METHODS))])
        return self.app(environ, start_response)


def _refuse(start_response, status: str, message: str, headers=()):
    body = (message + "\n").encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
                            *headers])
    return [body]


class ThreadingServer(ThreadingMixIn, WSGIServer):
    """wsgiref's server, a thread per connection (wsgiref alone serves one at a time)."""

    daemon_threads = True  # Ctrl-C does not wait for an idle connection

    def handle_error(self, request, client_address):
        # A client that went away or stayed idle past the timeout: not worth a traceback on the console.
        log.debug("dashboard: connection from %s ended with an error", client_address[0], exc_info=True)


class QuietHandler(WSGIRequestHandler):
    timeout = 60  # an idle connection (a browser's preconnect) holds its thread at most this long

    def address_string(self):  # no reverse DNS lookup
        return self.client_address[0]

    def log_request(self, *args, **kwargs):  # no line per request
        pass
