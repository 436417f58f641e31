"""The read-only status page the daemon serves at ``/`` to a browser.

One HTML document, no scripts beyond a periodic reload, built from the same summary as
``/status.json``: the daemon, task counts by kind and state, running tasks with progress bars
(bytes and ETA), and recent failures with their messages. Every value is escaped.
"""

from __future__ import annotations

from html import escape
from typing import Any

REFRESH_SECONDS = 5

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 2rem; }
table { border-collapse: collapse; } td, th { padding: .3rem .8rem; border-bottom: 1px solid #ddd; text-align: left; }
progress { width: 16rem; } .ready { color: #070; } .notready { color: #a00; } .error { color: #a00; }
.muted { color: #777; }
"""


def human_bytes(count: float | None) -> str:
    if count is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"  # pragma: no cover - the loop always returns


def human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def _bytes(done: float | None, total: float | None) -> str:
    """Bytes done of the total; a dash until the conversion has reported any."""
    return "&ndash;" if done is None and total is None else f"{human_bytes(done)} / {human_bytes(total)}"


def _eta(seconds: float | None) -> str:
    return "&ndash;" if seconds is None else human_seconds(seconds)


def _counts(counts: dict[str, dict[str, int]]) -> str:
    if not counts:
        return '<p class="muted">No tasks yet.</p>'
    states = sorted({state for by_state in counts.values() for state in by_state})
    head = "".join(f"<th>{escape(state)}</th>" for state in states)
    rows = "".join(
        f"<tr><td>{escape(kind)}</td>" + "".join(f"<td>{by_state.get(state, 0)}</td>" for state in states) + "</tr>"
        for kind, by_state in sorted(counts.items()))
    return f'<table id="counts"><tr><th>kind</th>{head}</tr>{rows}</table>'


def _running(tasks: list[dict[str, Any]]) -> str:
    if not tasks:
        return '<p class="muted">No task is running.</p>'
    rows = []
    for task in tasks:
        percent = float(task.get("progress") or 0)
        done, total = task.get("bytes_done"), task.get("bytes_total")
        rows.append(
            f"<tr><td>{escape(str(task.get('task_id', '')))}</td><td>{escape(str(task.get('kind', '')))}</td>"
            f"<td>{escape(str(task.get('status_message', '')))}</td>"
            f'<td><progress max="100" value="{percent:.0f}"></progress> {percent:.0f}%</td>'
            f"<td>{_bytes(done, total)}</td><td>{_eta(task.get('eta_seconds'))}</td></tr>")
    return ('<table id="running"><tr><th>task</th><th>kind</th><th>phase</th><th>progress</th><th>bytes</th>'
            f"<th>ETA</th></tr>{''.join(rows)}</table>")


def _failures(tasks: list[dict[str, Any]]) -> str:
    if not tasks:
        return '<p class="muted">No recent failures.</p>'
    items = "".join(
        f"<li><b>{escape(str(task.get('task_id', '')))}</b> <span class=\"muted\">"
        f"{escape(str(task.get('kind', '')))} {escape(str(task.get('when', '')))}</span><br>"
        f"<span class=\"error\">{escape(str(task.get('status_message', '')))}</span></li>"
        for task in tasks)
    return f'<ul id="failures">{items}</ul>'


def render_page(status: dict[str, Any]) -> str:
    ready = status.get("ready", False)
    listen = ", ".join(escape(address) for address in status.get("listen", []))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>vmied status</title>
<meta http-equiv="refresh" content="{REFRESH_SECONDS}"><style>{_STYLE}</style></head>
<body>
<h1>vmied {escape(str(status.get("version", "")))}
 <span class="{'ready' if ready else 'notready'}">{'ready' if ready else 'not ready'}</span></h1>
<p>Region {escape(str(status.get("region", "")))} &middot; listening on {listen}
 &middot; up {human_seconds(status.get("uptime_seconds"))}</p>
<h2>Tasks</h2>{_counts(status.get("counts", {}))}
<h2>Running</h2>{_running(status.get("running", []))}
<h2>Recent failures</h2>{_failures(status.get("failed", []))}
<p class="muted"><a href="/metrics">metrics</a> &middot; <a href="/status.json">status.json</a></p>
</body></html>
"""
