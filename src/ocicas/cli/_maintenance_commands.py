"""``gc`` and ``fsck``: collecting garbage and checking a layout."""

from __future__ import annotations

from typing import Any

import click

from .._errors import BlobNotFoundError, InvalidError
from .._gc import DEFAULT_GRACE_PERIOD, GCResult
from .._gc import gc as collect
from ._fsck import CheckReport, check_store
from ._locations import open_location
from ._output import emit_json, json_option
from ._params import DURATION, human_duration, human_size
from ._progress import Display
from ._run import ExitCode, run
from ._temp_dirs import StaleDir, stale_temp_dirs, still_there

__all__ = ["fsck", "gc"]

_LAYOUT = click.Path(file_okay=False)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _temp_json(key: str, dirs: list[StaleDir]) -> dict[str, Any]:
    return {
        key: [{"name": d.name, "size": d.size} for d in dirs],
        f"{key}_count": len(dirs),
        f"{key}_bytes": sum(d.size for d in dirs),
    }


def _temp_summary(dirs: list[StaleDir]) -> str:
    noun = "stale temporary directory" if len(dirs) == 1 else "stale temporary directories"
    return f"{len(dirs)} {noun} ({human_size(sum(d.size for d in dirs))})"


@click.command()
@click.argument("layout", type=_LAYOUT)
@click.option("-n", "--dry-run", is_flag=True, help="Only say what would be removed.")
@click.option(
    "--grace",
    type=DURATION,
    default=human_duration(DEFAULT_GRACE_PERIOD),
    show_default=True,
    help="Keep unreachable blobs written or freshened this recently (0, 30s, 10m, 1h, 2d).",
)
@click.option(
    "--no-referrers", is_flag=True, help="Remove unreachable referrers (signatures, SBOMs) of live content too."
)
@click.option("--broken-ok", is_flag=True, help="Treat missing or unparseable manifests as leaves instead of stopping.")
@json_option
def gc(layout: str, dry_run: bool, grace: float, no_referrers: bool, broken_ok: bool, as_json: bool) -> None:
    """Remove every blob of LAYOUT that no reference reaches, and print what went.

    Referrers of live content are kept, and so are blobs younger than the grace
    period, so writers that have not tagged their blobs yet lose nothing. A
    missing or broken manifest stops the collection before anything is removed
    (--broken-ok collects a partial layout anyway). Temporary directories that
    killed ocicas processes left in the layout are removed too.

    \b
    JSON output (--json): one object; every list is sorted and has a count:
      dry_run                  true with --dry-run (then nothing was removed)
      removed, removed_count   blobs removed (or that would be)
      removed_bytes            the bytes those blobs held
      stale_temp_dirs, _count  [{"name", "size"}]: stale temporary directories
      stale_temp_dirs_bytes    removed (or that would be), and their bytes
      bytes_freed              removed_bytes + stale_temp_dirs_bytes
      live, live_count         blobs the references reach
      referrers, referrers_count  unreachable referrers kept for live content
      fresh, fresh_count       unreachable blobs kept for the grace period
      broken, broken_count     missing or broken nodes taken as leaves (--broken-ok)

    \b
    Examples:
      ocicas gc --dry-run ./images
      ocicas gc --grace 0 ./images
    """

    async def work() -> tuple[GCResult, list[StaleDir]]:
        async with open_location(layout) as engine:
            stale = await stale_temp_dirs(engine)
            try:
                result = await collect(
                    engine,
                    grace_period=grace,
                    referrers=not no_referrers,
                    broken_ok=broken_ok,
                    dry_run=dry_run,
                )
            except (BlobNotFoundError, InvalidError) as exc:
                if broken_ok:
                    raise
                raise type(exc)(f"{exc} (nothing removed; --broken-ok collects anyway)") from exc
            if not dry_run:  # measured before the engine's gc() removed them: what it freed
                left = await still_there(engine, stale)
                stale = [d for d in stale if d.name not in left]
            return result, stale

    with Display("spinner") as display:
        display.bar(f"{'checking' if dry_run else 'collecting'} {layout}")
        result, stale = run(work)
    temp_bytes = sum(d.size for d in stale)
    if as_json:
        document: dict[str, Any] = {
            "dry_run": result.dry_run,
            "removed": list(result.removed),
            "removed_count": len(result.removed),
            "removed_bytes": result.bytes_freed,
            **_temp_json("stale_temp_dirs", stale),
            "bytes_freed": result.bytes_freed + temp_bytes,
        }
        for key, digests in (
            ("live", result.live),
            ("referrers", result.referrers),
            ("fresh", result.fresh),
            ("broken", result.broken),
        ):
            document[key] = sorted(digests)
            document[f"{key}_count"] = len(digests)
        emit_json(document)
        return
    for digest in result.removed:
        click.echo(digest)
    verb = "would remove" if dry_run else "removed"
    summary = f"{verb} {_plural(len(result.removed), 'blob')}, {human_size(result.bytes_freed)}"
    if stale:
        summary += f", and {_temp_summary(stale)}"
    if result.fresh:
        summary += f"; kept {_plural(len(result.fresh), 'unreachable blob')} younger than {human_duration(grace)}"
    click.echo(summary)


@click.command()
@click.argument("layout", type=_LAYOUT)
@json_option
def fsck(layout: str, as_json: bool) -> int:
    """Check LAYOUT: every blob against its digest, every reference's graph for gaps.

    Reports corrupt blobs (bytes or size not matching), missing content a
    reference reaches, dangling references (pointing at a missing blob) and
    manifests or indexes that do not parse. The exit status is 4 if anything is
    wrong. Stale temporary directories (left by killed ocicas processes) are
    not damage: they are listed with their size, for gc to remove.

    \b
    JSON output (--json): one object:
      ok                       true if no problems were found
      blobs_count, bytes       blobs verified and their bytes
      roots_count              roots (references and unnamed roots) walked
      problems, problems_count [{"kind", "subject", "message"}], kind is
                               corrupt, missing, dangling or invalid
      notes                    [{"kind", "subject", "message"}]: not damage; kind
                               absent-subject (a referrer's subject is not here)
      stale_temp_dirs, _count  [{"name", "size"}]: temporary directories no live
      stale_temp_dirs_bytes    engine holds, and their bytes

    \b
    Examples:
      ocicas fsck ./images
      ocicas fsck --json ./images | jq '.problems[] | select(.kind == "missing")'
    """

    async def work(display: Display) -> tuple[CheckReport, list[StaleDir]]:
        bar = display.bar(f"verifying {layout}")
        async with open_location(layout) as engine:
            stale = await stale_temp_dirs(engine)
            return await check_store(engine, on_total=bar.set_total, on_bytes=bar.advance), stale

    with Display() as display:
        report, stale = run(lambda: work(display))
    if as_json:
        emit_json(
            {
                "ok": report.ok,
                "blobs_count": report.blobs,
                "bytes": report.bytes,
                "roots_count": report.roots,
                "problems": [{"kind": p.kind, "subject": p.subject, "message": p.message} for p in report.problems],
                "problems_count": len(report.problems),
                "notes": [{"kind": n.kind, "subject": n.subject, "message": n.message} for n in report.notes],
                **_temp_json("stale_temp_dirs", stale),
            }
        )
    else:
        for problem in report.problems:
            click.echo(f"{problem.kind}: {problem.message}")
        for note in report.notes:
            click.echo(f"note: {note.message}")
        for d in stale:
            click.echo(f"stale temporary directory {d.name}: {human_size(d.size)} (not damage; gc removes it)")
        found = _plural(len(report.problems), "problem") if report.problems else "no problems"
        click.echo(
            f"checked {_plural(report.blobs, 'blob')} ({human_size(report.bytes)}) "
            f"and {_plural(report.roots, 'root')}: {found}"
            + (f"; {_temp_summary(stale)} for gc to remove" if stale else "")
        )
    return ExitCode.OK if report.ok else ExitCode.INVALID
