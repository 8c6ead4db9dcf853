"""``gc`` and ``fsck``: collecting garbage and checking a layout."""

from __future__ import annotations

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

__all__ = ["fsck", "gc"]

_LAYOUT = click.Path(file_okay=False)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


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
    (--broken-ok collects a partial layout anyway).

    \b
    Examples:
      ocicas gc --dry-run ./images
      ocicas gc --grace 0 ./images
    """

    async def work() -> GCResult:
        async with open_location(layout) as engine:
            try:
                return await collect(
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

    with Display("spinner") as display:
        display.bar(f"{'checking' if dry_run else 'collecting'} {layout}")
        result = run(work)
    if as_json:
        emit_json(
            {
                "dry_run": result.dry_run,
                "removed": list(result.removed),
                "bytes_freed": result.bytes_freed,
                "live": len(result.live),
                "referrers": sorted(result.referrers),
                "fresh": sorted(result.fresh),
                "broken": sorted(result.broken),
            }
        )
        return
    for digest in result.removed:
        click.echo(digest)
    verb = "would remove" if dry_run else "removed"
    summary = f"{verb} {_plural(len(result.removed), 'blob')}, {human_size(result.bytes_freed)}"
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
    wrong.

    \b
    Examples:
      ocicas fsck ./images
      ocicas fsck --json ./images | jq '.problems[] | select(.kind == "missing")'
    """

    async def work(display: Display) -> CheckReport:
        bar = display.bar(f"verifying {layout}")
        async with open_location(layout) as engine:
            return await check_store(engine, on_total=bar.set_total, on_bytes=bar.advance)

    with Display() as display:
        report = run(lambda: work(display))
    if as_json:
        emit_json(
            {
                "ok": report.ok,
                "blobs": report.blobs,
                "bytes": report.bytes,
                "roots": report.roots,
                "problems": [{"kind": p.kind, "subject": p.subject, "message": p.message} for p in report.problems],
            }
        )
    else:
        for problem in report.problems:
            click.echo(f"{problem.kind}: {problem.message}")
        found = _plural(len(report.problems), "problem") if report.problems else "no problems"
        click.echo(
            f"checked {_plural(report.blobs, 'blob')} ({human_size(report.bytes)}) "
            f"and {_plural(report.roots, 'root')}: {found}"
        )
    return ExitCode.OK if report.ok else ExitCode.INVALID
