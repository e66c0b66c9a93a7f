"""`fleetlm dashboards export DIR` and `fleetlm dashboards push --grafana-url URL --api-key KEY`."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from cluster.dashboards import build_all


def export(out_dir: Path) -> list[Path]:
    """Write one ``<uid>.json`` per dashboard into ``out_dir`` (created); returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for uid, dash in build_all().items():
        path = out_dir / f"{uid}.json"
        path.write_text(json.dumps(dash, indent=2, sort_keys=True) + "\n")
        paths.append(path)
    return paths


def folder_uid(title: str) -> str:
    """A stable folder uid from its title (Grafana uids: <= 40 chars of [A-Za-z0-9_-])."""
    slug = re.sub(r"[^a-z0-9_-]+", "-", title.lower()).strip("-")
    if not slug:
        raise ValueError(f"folder: {title!r} has no letters or digits to build a uid from")
    return slug[:40]


def push(grafana_url: str, api_key: str, folder: str | None = None) -> list[dict]:
    """Create or update every dashboard in Grafana (overwriting by uid), in ``folder`` if given.

    Calls: GET /api/folders (+ POST /api/folders when the folder is missing), then per dashboard
    GET /api/search?type=dash-db&dashboardUIDs=UID (to report created vs updated) and
    POST /api/dashboards/db with overwrite. Returns one {uid, url, status, action} per dashboard.
    """
    from grafana_client import GrafanaApi

    api = GrafanaApi.from_url(grafana_url, credential=api_key)
    folder_uid_ = None
    if folder:
        folders = api.folder.get_all_folders()
        match = next((f for f in folders if f.get("title") == folder), None)
        if match is None:
            match = api.folder.create_folder(folder, uid=folder_uid(folder))
        folder_uid_ = match["uid"]
    results = []
    for uid, dash in build_all().items():
        found = api.search.search_dashboards(type_="dash-db", dashboard_uids=uid)
        body: dict = {"dashboard": dash, "overwrite": True, "message": "fleetlm dashboards push"}
        if folder_uid_ is not None:
            body["folderUid"] = folder_uid_
        resp = api.dashboard.update_dashboard(body)
        results.append(
            {
                "uid": uid,
                "url": resp.get("url", ""),
                "status": resp.get("status", ""),
                "action": "updated" if found else "created",
            }
        )
    return results


def _cmd_export(args: argparse.Namespace) -> int:
    for path in export(Path(args.dir)):
        print(path)
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from cluster.cli import CLIError

    api_key = args.api_key or os.environ.get("GRAFANA_API_KEY")
    if not api_key:
        raise CLIError("--api-key: required (or set GRAFANA_API_KEY)")
    try:
        results = push(args.grafana_url, api_key, args.folder)
    except ValueError as e:
        raise CLIError(str(e)) from e
    except Exception as e:  # grafana_client raises its own hierarchy plus network errors
        raise CLIError(f"grafana push to {args.grafana_url} failed: {e}") from e
    for r in results:
        print(f"{r['action']:8} {r['uid']}  {r['url']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboards", help="export or push the Grafana dashboards")
    dsub = p.add_subparsers(dest="dashboards_command", metavar="ACTION", required=True)
    e = dsub.add_parser("export", help="write the dashboards as JSON files into DIR")
    e.add_argument("dir", metavar="DIR")
    e.set_defaults(func=_cmd_export)
    u = dsub.add_parser("push", help="create/update the dashboards in Grafana")
    u.add_argument("--grafana-url", required=True, help="e.g. http://grafana:3000")
    u.add_argument("--api-key", help="service account token (default: $GRAFANA_API_KEY)")
    u.add_argument("--folder", help="folder title (created if missing)")
    u.set_defaults(func=_cmd_push)
