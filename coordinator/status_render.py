"""HTML of the status page, rendered from a :func:`coordinator.status_page.status_snapshot` (every value escaped)."""

from __future__ import annotations

import time
from html import escape
from importlib import resources
from string import Template
from typing import Any
from urllib.parse import quote

REFRESH_S = 10


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _num(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"


def _age(seconds: float) -> str:
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def _when(t: float | None) -> str:
    return "–" if not t else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _badge(state: str) -> str:
    return f'<span class="badge {_e(state)}">{_e(state)}</span>'


def _short(peer_id: str) -> str:
    text = peer_id if len(peer_id) <= 16 else f"{peer_id[:6]}…{peer_id[-6:]}"
    return f'<code title="{_e(peer_id)}">{_e(text)}</code>'


def _round_section(r: dict[str, Any] | None) -> str:
    if r is None:
        return '<section id="round"><h2>Round</h2><p class="muted">No round yet.</p></section>'
    bars = []
    for lim in r["limits"]:
        pct = 100 * lim["fraction"]
        name, done, target = lim["limit"], lim["done"], lim["target"]
        figures = f"{done:,.0f} s of {target:,.0f} s" if name == "seconds" else f"{done:,} of {target:,} {name}"
        bars.append(
            f'<div class="limit" data-limit="{_e(name)}">{_e(figures)}<div class="bar">'
            f'<span style="width:{pct:.1f}%"></span><em>{pct:.0f}%</em></div></div>'
        )
    parent = r["parent_adapter"]
    parent_html = f'<a href="#adapter-{_e(parent)}">{_e(parent)}</a>' if parent else "fresh LoRA"
    removed = "".join(
        f'<li class="removed" data-peer="{_e(x["peer_id"])}">{_short(x["peer_id"])} {_badge("expelled")} '
        f"{_e(x['reason'])}</li>"
        for x in r.get("removed", [])
    )
    if removed:
        bars.append(f'<h3>Removed members</h3><ul class="removed">{removed}</ul>')
    return (
        f'<section id="round" data-round="{_e(r["round_id"])}" data-state="{_e(r["state"])}">'
        f"<h2>Round <code>{_e(r['round_id'])}</code> {_badge(r['state'])}</h2>"
        f"<p>Base model <code>{_e(r['base_model'])}</code> ({r['num_layers']} blocks) · starts from {parent_html} · "
        f"{_num(r['samples'], 6)} samples · epoch {r['epochs']} · trained {r['elapsed_s']:.0f} s · "
        f"started {_when(r['started_at'])}</p>{''.join(bars)}</section>"
    )


def _map_section(spans: list[dict[str, Any]], peers: list[dict[str, Any]]) -> str:
    if not spans:
        return ""
    blocks = []
    for s in spans:
        cls = f"r{min(s['live_replicas'], 2)}"
        for b in range(s["start"], s["end"]):
            blocks.append(f'<div class="block {cls}" title="block {b}: span {_e(s["name"])}, '
                          f'{s["live_replicas"]} live server(s)">{b}</div>')  # fmt: skip
    by_id = {p["peer_id"]: p for p in peers}
    cards = []
    for s in spans:
        rows = []
        for pid in s["peers"]:
            p = by_id[pid]
            rows.append(
                f'<tr class="peer-row" data-peer="{_e(pid)}"><td>{_short(pid)}</td><td>{_badge(p["state"])}</td>'
                f'<td class="num">{_num(p["throughput"])}</td><td class="num">{p["epoch"]}</td>'
                f'<td class="num">{_num(p["loss"])}</td><td>{_age(p["heartbeat_age_s"])}</td></tr>'
            )
        table = (
            '<table><tr><th>peer</th><th>state</th><th class="num">samples/s</th><th class="num">epoch</th>'
            f'<th class="num">loss</th><th>heartbeat</th></tr>{"".join(rows)}</table>'
            if rows
            else '<p class="muted">No live server: this span blocks training.</p>'
        )
        uncovered = "" if s["live_replicas"] else " uncovered"
        cards.append(
            f'<div class="span-card{uncovered}" data-span="{_e(s["name"])}"><h3>Span {_e(s["name"])} '
            f'<span class="muted">(blocks {s["start"]}–{s["end"] - 1})</span></h3><div class="figures">'
            f"{s['live_replicas']} live server(s) · {_num(s['throughput'])} samples/s</div>{table}</div>"
        )
    return (
        '<section id="swarm-map"><h2>Swarm map</h2><div class="muted">Blocks by live servers '
        f'(red: none, amber: one, green: two or more)</div><div class="coverage">{"".join(blocks)}</div>'
        f'<div class="spans">{"".join(cards)}</div></section>'
    )


def _peers_section(peers: list[dict[str, Any]]) -> str:
    if not peers:
        return '<section id="peers"><h2>Members</h2><p class="muted">No peer has joined this round.</p></section>'
    rows = "".join(
        f'<tr data-peer="{_e(p["peer_id"])}"><td>{_short(p["peer_id"])}</td><td>{_e(p["span"])}</td>'
        f'<td>{_badge(p["state"])}</td><td class="num">{_num(p["throughput"])}</td>'
        f'<td class="num">{_num(p["samples"], 6)}</td><td class="num">{p["epoch"]}</td>'
        f'<td class="num">{_num(p["loss"])}</td><td>{_e(p["device"] or "–")}</td>'
        f"<td>{_age(p['heartbeat_age_s'])}</td></tr>"
        for p in peers
    )
    return (
        f'<section id="peers"><h2>Members ({len(peers)})</h2><table><tr><th>peer</th><th>span</th><th>state</th>'
        '<th class="num">samples/s</th><th class="num">samples</th><th class="num">epoch</th><th class="num">loss</th>'
        f"<th>device</th><th>last heartbeat</th></tr>{rows}</table></section>"
    )


def _eval_cell(a: dict[str, Any]) -> str:
    before, after = a["eval_loss_before"], a["eval_loss_after"]
    if after is None:
        after = a["eval_loss_reported"]
    if before is None or after is None:
        return _num(after)
    cls = "better" if after < before else "worse" if after > before else ""
    return f'{_num(before)} → <span class="{cls}">{_num(after)}</span> ({after - before:+.3f})'


def _lineage(adapters: list[dict[str, Any]], rounds: list[dict[str, Any]]) -> str:
    """Adapters as a tree (a merge appears under each parent); active rounds hang under the adapter they extend."""
    by_version = {a["version"]: a for a in adapters}
    children: dict[str, list[str]] = {}
    roots = []
    for a in adapters:
        parents = [p for p in a["parents"] if p in by_version]
        if not parents:
            roots.append(a["version"])
        for p in parents:
            children.setdefault(p, []).append(a["version"])
    pending: dict[str, list[str]] = {}
    for r in rounds:
        if r["state"] in ("open", "training", "finalizing"):
            item = f'<li class="pending">round <code>{_e(r["round_id"])}</code> {_badge(r["state"])}</li>'
            pending.setdefault(r["parent"] if r["parent"] in by_version else "", []).append(item)

    def tree(version: str, seen: frozenset[str]) -> str:
        a = by_version[version]
        kids = [c for c in children.get(version, []) if c not in seen]
        sub = "".join(tree(c, seen | {c}) for c in kids) + "".join(pending.get(version, []))
        after = a["eval_loss_after"] if a["eval_loss_after"] is not None else a["eval_loss_reported"]
        figures = f' <span class="muted">round {_e(a["round_id"])} · eval {_num(after)}</span>'
        return (
            f'<li data-version="{_e(version)}"><a href="#adapter-{_e(version)}">{_e(version)}</a>{figures}'
            f"{f'<ul>{sub}</ul>' if sub else ''}</li>"
        )

    items = "".join(tree(r, frozenset({r})) for r in roots) + "".join(pending.get("", []))
    return f'<div class="lineage"><ul>{items}</ul></div>'


def _adapters_section(adapters: list[dict[str, Any]], rounds: list[dict[str, Any]]) -> str:
    if not adapters:
        return (
            '<section id="adapters"><h2>Adapter registry</h2><p class="muted">No adapter published yet.</p></section>'
        )
    rows = []
    for a in reversed(adapters):
        parents = ", ".join(f'<a href="#adapter-{_e(p)}">{_e(p)}</a>' for p in a["parents"]) or "–"
        links = " ".join(f'<a class="download" href="{_e(quote(f["url"]))}" download>{_e(f["name"])}</a>'
                         for f in a["files"])  # fmt: skip
        if a["error"]:
            links += f' <span class="worse">{_e(a["error"])}</span>'
        samples = sum(c["samples"] for c in a["contributors"])
        rows.append(
            f'<tr id="adapter-{_e(a["version"])}" class="adapter-row" data-version="{_e(a["version"])}">'
            f"<td><b>{_e(a['version'])}</b></td><td>{parents}</td><td><code>{_e(a['round_id'])}</code></td>"
            f"<td>{_when(a['created_at'])}</td><td>{_eval_cell(a)}</td>"
            f'<td class="num">{len(a["contributors"])} / {_num(samples, 6)}</td>'
            f'<td><code title="{_e(a["sha256"])}">{_e(a["sha256"][:12])}</code></td><td>{links}</td></tr>'
        )
    return (
        f'<section id="adapters"><h2>Adapter registry ({len(adapters)})</h2><table><tr><th>version</th>'
        "<th>parents</th><th>round</th><th>published</th><th>eval loss (parent → this)</th>"
        f'<th class="num">contributors / samples</th><th>sha256</th><th>download</th></tr>{"".join(rows)}</table>'
        f"<h2 style='margin-top:14px'>Lineage</h2>{_lineage(adapters, rounds)}</section>"
    )


def render_page(snap: dict[str, Any]) -> str:
    """The whole page; ``snap`` is the :func:`~coordinator.status_page.status_snapshot` dict."""
    template = Template(resources.files("coordinator").joinpath("templates/status.html").read_text("utf-8"))
    r = snap["round"]
    title = f"loraswarm · {r['round_id']} {r['state']}" if r else "loraswarm coordinator"
    subtitle = (
        f"v{_e(snap['software_version'])} · {len(snap['peers'])} member(s) · {len(snap['adapters'])} adapter(s) · "
        f"updated {_when(snap['generated_at'])} · refreshes every {REFRESH_S} s · "
        '<a href="/api/status" style="color:#93c5fd">JSON</a> · <a href="/metrics" style="color:#93c5fd">metrics</a>'
    )
    content = "".join([
        _round_section(r), _map_section(snap["spans"], snap["peers"]), _peers_section(snap["peers"]),
        _adapters_section(snap["adapters"], snap["rounds"]),
    ])  # fmt: skip
    return template.substitute(title=_e(title), subtitle=subtitle, refresh=REFRESH_S, content=content)
