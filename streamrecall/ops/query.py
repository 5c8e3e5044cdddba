"""`streamrecall query`: ask a running indexer for recall results and print them as a table.

Exactly one of ``--user-id`` (the user's latest vector, else trending), ``--vector-file``
(a JSON list of floats, ``-`` for stdin) or ``--item-id`` (items like this one: its stored
vector, itself excluded). The indexer's address comes from ``--url``, else
``--http-host``/``--http-port`` (the same variables the indexer reads).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, TextIO

import click

from streamrecall.settings import ADMIN_PORT_OFFSET, DEFAULT_PORTS

TIMEOUT_S = 10.0


@click.command("query")
@click.option("--user-id", help="Recall for this user (from the user's latest vector, else trending).")
@click.option("--vector-file", type=click.File("r"), help="Recall for a query vector: a JSON list of floats ('-': stdin).")
@click.option("--item-id", help="Items like this one (its stored vector; the item itself is left out).")
@click.option("-k", "k", type=click.IntRange(1), default=10, show_default=True, help="Results wanted.")
@click.option("--exclude-seen", is_flag=True, help="With --user-id: leave out the user's recent items.")
@click.option("--max-per-category", type=click.IntRange(1), default=None, help="At most N results per category.")
@click.option("--url", envvar="STREAMRECALL_INDEXER_URL", show_envvar=True, default=None,
              help="The indexer API's base URL (default: http://HTTP_HOST:HTTP_PORT).")
@click.option("--http-host", envvar="STREAMRECALL_HTTP_HOST", show_envvar=True, default="127.0.0.1",
              show_default=True, help="The indexer's HTTP host.")
@click.option("--http-port", envvar="STREAMRECALL_HTTP_PORT", show_envvar=True, type=click.IntRange(1, 65535),
              default=DEFAULT_PORTS["indexer"], show_default=True, help="The indexer's HTTP port.")
@click.option("--admin-url", envvar="STREAMRECALL_INDEXER_ADMIN_URL", show_envvar=True, default=None,
              help="The indexer's admin base URL, for --item-id's vector (default: http://HTTP_HOST:ADMIN_PORT).")
@click.option("--admin-port", envvar="STREAMRECALL_ADMIN_PORT", show_envvar=True, type=click.IntRange(1, 65535),
              default=None, help=f"The indexer's admin port (default: the HTTP port + {ADMIN_PORT_OFFSET}).")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON answer instead of a table.")
def command(user_id: str | None, vector_file: TextIO | None, item_id: str | None, k: int, exclude_seen: bool,
            max_per_category: int | None, url: str | None, http_host: str, http_port: int, admin_url: str | None,
            admin_port: int | None, as_json: bool) -> None:
    """Query the indexer's recall API and print rank, item, score and categories."""
    chosen = [name for name, v in (("--user-id", user_id), ("--vector-file", vector_file), ("--item-id", item_id))
              if v is not None]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one of --user-id, --vector-file, --item-id"
                               + (f" (got {', '.join(chosen)})" if chosen else ""))
    if exclude_seen and user_id is None:
        raise click.UsageError("--exclude-seen only applies to --user-id")
    base = (url or f"http://{_connect_host(http_host)}:{http_port}").rstrip("/")
    if user_id is not None:
        params = {"user_id": user_id, "k": k}
        if exclude_seen:
            params["exclude_seen"] = 1
        if max_per_category is not None:
            params["max_per_category"] = max_per_category
        answer = _call(base, "GET", "/recall?" + urllib.parse.urlencode(params))
    else:
        exclude: list[str] = []
        if vector_file is not None:
            vector = _read_vector(vector_file)
        else:
            # Stored vectors are an admin view: the admin listener serves them, not the public port.
            admin = (admin_url or f"http://{_connect_host(http_host)}:"
                     f"{admin_port or http_port + ADMIN_PORT_OFFSET}").rstrip("/")
            item = _call(admin, "GET", f"/items/{urllib.parse.quote(item_id or '', safe='')}?with_vector=1")
            vector, exclude = item["vector"], [item_id or ""]
        payload: dict[str, Any] = {"vector": vector, "k": k, "exclude": exclude}
        if max_per_category is not None:
            payload["max_per_category"] = max_per_category
        answer = _call(base, "POST", "/recall", payload)
    if as_json:
        click.echo(json.dumps(answer, indent=2))
    else:
        click.echo(format_answer(answer))


def format_answer(answer: dict[str, Any]) -> str:
    """The readable form: a header line with route and versions, then one row per result."""
    v = answer.get("model_versions", {})
    head = [f"route: {answer.get('route')}"]
    if v.get("scored") is not None and answer.get("route") in ("user-vector", "vector"):
        head.append(f"scored by model v{v['scored']}")
    head.append(f"index v{v.get('index')} (graph epoch {v.get('index_epoch')})")
    if v.get("user_vector") is not None:
        encoded = " (re-encoded at query time)" if answer.get("user_encoded") == "query-time" else ""
        head.append(f"stored user vector v{v['user_vector']}{encoded}")
    results = answer.get("results", [])
    rows = [("rank", "item_id", "score", "version", "categories")]
    for r in results:
        score = "-" if r.get("score") is None else f"{r['score']:.4f}"
        rows.append((str(r["rank"]), r["item_id"], score, str(r.get("model_version", "")),
                     ", ".join(r.get("categories", []))))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join([row[0].rjust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2]),
                        row[3].rjust(widths[3]), row[4]]).rstrip() for row in rows]
    if not results:
        lines.append("(no results)")
    return " | ".join(head) + "\n" + "\n".join(lines)


def _connect_host(host: str) -> str:
    """A bind-all address is not one to connect to: use loopback."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _read_vector(f: TextIO) -> list[float]:
    try:
        vector = json.load(f)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--vector-file") from None
    if isinstance(vector, dict):
        vector = vector.get("vector")
    if not isinstance(vector, list):
        raise click.BadParameter('expected a JSON list of numbers (or {"vector": [...]})', param_hint="--vector-file")
    return vector


def _call(base: str, method: str, path: str, payload: Any = None) -> dict[str, Any]:
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            message = exc.reason
        raise click.ClickException(f"{method} {path.split('?')[0]}: {exc.code} {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise click.ClickException(f"cannot reach the indexer at {base}: {reason} "
                                   "(is `streamrecall run indexer` running? see --url/--http-port)") from None
