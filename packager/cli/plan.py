"""`pack targets` and `pack plan`: the device classes, and what a model would become on one."""

from __future__ import annotations

import json
from pathlib import Path

import click

from packager.cli.options import size_callback as _size
from packager.errors import UsageError
from packager.formats import FORMATS, all_schemes, format_of_scheme, get_format
from packager.pack.draft import check_self_type, parse_draft
from packager.pack.onnx import DRAFT_REFUSAL
from packager.pack.pipeline import check_architecture
from packager.plan.inputs import plan_input
from packager.plan.planner import Overrides
from packager.plan.report import as_json as plan_json, draft_outlook, plan_for, render, render_draft
from packager.plan.targets import list_targets, load_target, profile_sources
from packager.quants import get_quant


@click.command("targets")
@click.option("--json", "as_json", is_flag=True, help="Print the profiles as JSON on stdout.")
@click.option("--explain", is_flag=True,
              help="Print each target's app and store limits (download cap, part size, whole-app cap, delivery) "
                   "with the source each profile cites.")
def targets_cmd(as_json: bool, explain: bool = False) -> None:
    """List the device classes edgepack can pack for.

    With --explain, also each target's app limits and store limits (download cap, part size,
    whole-app cap, how parts are delivered), each with the source the profile cites.
    """
    targets = list_targets()
    if as_json:
        click.echo(json.dumps([t.as_dict() for t in targets], indent=2))
        return
    if explain:
        for t in targets:
            click.echo(f"{t.name} ({t.distribution.channel}): {t.description}")
            for _table, key, value, source in profile_sources(t):
                shown = f"{value / 1e6:,.0f} MB" if isinstance(value, int) else str(value)
                click.echo(f"  {key:<24} {shown}" + (f"\n  {'':<24} source: {source}" if source else ""))
            click.echo("")
        return
    rows = [(t.name, ",".join(t.aliases) or "-", f"{t.ram_bytes / 2**30:.0f} GiB", f"{t.usable_ram_fraction:.0%}",
             ",".join(t.formats), t.quant_ladder[0], t.description) for t in targets]
    header = ("name", "aliases", "ram", "usable", "formats", "first quant", "description")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


@click.command("plan")
@click.argument("model")
@click.option("-t", "--target", default="laptop", show_default=True,
              help="Device class: a name from `pack targets`, an alias, a .toml profile, or 'host' (this machine, probed).")
@click.option("--quant", type=click.Choice(all_schemes(), case_sensitive=False),
              help="Plan at this quant only: a GGUF type, or an ONNX int4 scheme (INT4_B<block>[_ASYM|_HQQ], "
                   "which implies --format onnx). Default: the best one on the target's ladder that fits.")
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), help="Bundle format. Default: the target's first.")
@click.option("--ctx", "n_ctx", type=int, help="Context length (not shrunk). Default: the target's maximum that fits.")
@click.option("--ram", callback=_size, help="Override the target's RAM, e.g. 6GB.")
@click.option("--vram", callback=_size, help="Override the target's VRAM, e.g. 4GB.")
@click.option("--threads", "n_threads", type=int, help="Override the target's thread count.")
@click.option("--revision", help="Hub branch, tag or commit (hub ids only).")
@click.option("--part-size", callback=_size, help="Plan the model in files of at most this size (as pack model "
              "--part-size). Default: the target's [distribution] part_size.")
@click.option("--no-split", is_flag=True, help="Plan one model file whatever the target's part size.")
@click.option("--draft", metavar="DRAFT",
              help="Also say whether speculative decoding could pay off on the target, as `pack model --draft` "
                   "would draft: lookup, self:QUANT, or a smaller model (.gguf, checkpoint directory or hub id; "
                   "headers and config only). Prints what a step of 5 tokens and a draft token cost there, the "
                   "acceptance above which it pays, and the draft's memory. GGUF plans only.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON on stdout.")
@click.option("--explain", is_flag=True, help="Also print the arithmetic behind every number.")
def plan_cmd(model: str, target: str, quant: str | None, fmt: str | None, n_ctx: int | None, ram: int | None,
             vram: int | None, n_threads: int | None, revision: str | None, as_json: bool, explain: bool,
             part_size: int | None = None, no_split: bool = False, draft: str | None = None) -> None:
    """Will MODEL fit TARGET? Plan quant, context and GPU layers before converting anything.

    MODEL is a local checkpoint directory, a .gguf file, or a hub id: for a hub id only
    config.json (and model.safetensors.index.json) are fetched, never the weights.
    Exit code 1 with the numbers when nothing fits, 2 for bad input.

    \b
    Examples:
      pack plan Qwen/Qwen2.5-3B-Instruct --target android
      pack plan ./Llama-3.2-1B-Instruct --target gpu-4gb --explain
      pack plan model.gguf --target ios --ctx 8192 --json
      pack plan Qwen/Qwen2.5-1.5B-Instruct --target ./my-phone.toml --ram 6GB
      pack plan Qwen/Qwen2.5-0.5B-Instruct --target web --quant INT4_B64_HQQ
      pack plan Qwen/Qwen2.5-3B-Instruct --target android --draft Qwen/Qwen2.5-0.5B-Instruct
    """
    quant = quant.upper() if quant else None
    owner = format_of_scheme(quant) if quant else None
    if owner is not None and fmt is not None and fmt != owner.name:
        raise UsageError(f"--quant {quant} is {owner.noun}; drop --format {fmt} or pick {get_format(fmt).noun}")
    fmt = fmt or (owner.name if owner is not None else None)  # a scheme implies its format
    if part_size is not None and no_split:
        raise UsageError("--part-size and --no-split contradict each other; pass one")
    overrides = Overrides(quant=quant, format=fmt, n_ctx=n_ctx, ram_bytes=ram, vram_bytes=vram, n_threads=n_threads,
                          part_bytes=0 if no_split else part_size)
    req = parse_draft(draft) if draft else None  # a --draft that names nothing usable fails before any read
    tgt = load_target(target)  # an unknown target fails before any download
    inp = plan_input(model, revision=revision)
    if not Path(model).expanduser().is_file():  # a checkpoint, not a GGUF (bundled or requantized as it is)
        check_architecture(inp.spec, fmt or tgt.formats[0])  # what no converter takes is refused before a plan
    p = plan_for(inp, tgt, overrides)
    outlook = None
    if req is not None:
        if p.format != "gguf":
            raise UsageError(DRAFT_REFUSAL)
        if req.kind == "self":
            check_self_type(req, get_quant(p.quant))
        outlook = draft_outlook(inp, tgt, p, "model" if req.kind in ("gguf", "hf") else req.kind,
                                self_quant=req.quant.name if req.quant else None,
                                draft=plan_input(req.path or req.ref or "") if req.kind in ("gguf", "hf") else None)
    if as_json:
        click.echo(json.dumps({**plan_json(inp, tgt, p), **({"draft": outlook.as_dict()} if outlook else {})},
                              indent=2))
    else:
        click.echo(render(inp, tgt, p, explain=explain)
                   + (f"\n{render_draft(req.label, outlook)}" if req is not None and outlook is not None else ""))
