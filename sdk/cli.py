"""The ``tunehub`` command line. It only parses arguments, calls the SDK and turns typed errors
into one line on stderr and a non-zero exit code. Heavy imports (torch) happen inside the
commands that need them, so push/pull stay fast and work without torch."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from tunehub.errors import TunehubError
from tunehub.registry.store import VersionInfo

app = typer.Typer(
    name="tunehub",
    help="Train task modules on one base model, version them, serve them all at once.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
base_app = typer.Typer(help="Make and inspect base models.", no_args_is_help=True)
app.add_typer(base_app, name="base")
tenants_app = typer.Typer(help="Manage the tenants of `tunehub serve`.", no_args_is_help=True)
app.add_typer(tenants_app, name="tenants")
hub_app = typer.Typer(help="Run a private hub that speaks the Hugging Face Hub API.", no_args_is_help=True)
app.add_typer(hub_app, name="hub")
template_app = typer.Typer(help="Make hard-prompt template modules.", no_args_is_help=True)
app.add_typer(template_app, name="template")
tokenizer_app = typer.Typer(help="Train a domain tokenizer, or extend a base's with a domain's words.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")

RegistryOption = typer.Option(
    None,
    "--registry",
    "-r",
    help="registry URI: file://PATH or hf://NAMESPACE (default: $TUNEHUB_REGISTRY or $TUNEHUB_HOME/registry)",
    envvar="TUNEHUB_REGISTRY",
)
JsonOption = typer.Option(False, "--json", help="print JSON instead of a table")
TrustOption = typer.Option([], "--trust", help="a trusted public key (PEM file, or a folder of *.pem/*.pub); repeat for more")
RequireSignedOption = typer.Option(False, "--require-signed", help="refuse versions without a valid signature by a --trust key")


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging (same as TUNEHUB_LOG_LEVEL=debug)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="warnings and errors only (TUNEHUB_LOG_LEVEL=warning)"),
) -> None:
    """Train task modules on one base model, version them, serve them all at once."""
    from tunehub.logs import LOG_LEVEL_ENV, configure_logging, level_from_flags

    try:
        level = level_from_flags(verbose, quiet)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if level is not None:
        # the user's choice, for this process and the ones it starts (the serve child and its
        # worker, accelerate's ranks), which configure their logging from the environment
        os.environ[LOG_LEVEL_ENV] = level
    configure_logging(level)
    from tunehub.registry.hf import DEFAULT_ENDPOINT, prepare_environment

    # the CLI is where the process-wide choice of the Hub client's upload protocol is made
    prepare_environment(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)


def _registry(uri: str | None, trust: list[Path] | None = None, require_signed: bool = False):
    from tunehub.sdk.registry import Registry

    return Registry(uri, trust=trust or None, require_signed=require_signed)


def _signers(info: VersionInfo) -> str:
    from tunehub.registry.signing import short_key_id

    return ", ".join(short_key_id(s.key_id) for s in info.signatures)


def _echo_json(payload: object) -> None:
    typer.echo(json.dumps(payload, indent=2, default=str))


def _rows_table(header: tuple[str, ...] | list[str], rows: list, title: str, left: frozenset[int] = frozenset({0})) -> None:
    """``rows`` under ``header``: a rich table titled ``title`` on a terminal (columns in ``left``
    left-aligned, the others right-aligned); in a pipe, tab-separated lines, nothing cut."""
    if not sys.stdout.isatty():
        for row in [header, *rows]:
            typer.echo("\t".join(row))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, column in enumerate(header):
        table.add_column(column, overflow="fold", justify="left" if i in left else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def _version_table(infos: list[VersionInfo], title: str) -> None:
    """A table on a terminal; in a pipe, one tab-separated line per version, nothing cut.

    Pipe columns: ref, kind, task, aliases (comma-separated), size in bytes, created_at,
    pushed_by, note; tabs and newlines inside a value become spaces. ``--json`` has it all."""
    if not sys.stdout.isatty():
        for info in infos:
            note = f"yanked: {info.yank_reason or ''}" if info.yanked else ""
            row = (
                info.ref,
                info.kind,
                info.task or "",
                ",".join(info.aliases),
                str(info.size_bytes),
                info.created_at,
                info.pushed_by,
                note,
            )
            typer.echo("\t".join(" ".join(value.split()) if value else "" for value in row))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    # the name is what people copy: on a narrow terminal it wraps, it is never cut
    table.add_column("module", overflow="fold")
    for column in ("kind", "task", "aliases", "size", "created", "by", "note"):
        table.add_column(column)
    for info in infos:
        table.add_row(
            info.ref,
            info.kind,
            info.task or "",
            ",".join(info.aliases),
            f"{info.size_bytes / 1024:.1f} KiB",
            info.created_at[:19].replace("T", " "),
            info.pushed_by,
            f"yanked: {info.yank_reason or ''}" if info.yanked else "",
        )
    Console().print(table)


@app.command()
def push(
    path: Path = typer.Argument(..., help="module folder (holds manifest.json)"),
    name: str = typer.Argument(..., help="[namespace/]name; the registry assigns the version"),
    sign: Optional[Path] = typer.Option(None, "--sign", help="sign the version with this EC private key (PEM)"),
    registry: Optional[str] = RegistryOption,
) -> None:
    """Verify a module folder and store it as the next version of NAME."""
    info = _registry(registry).push(path, name, sign=sign)
    signed = f", signed by {_signers(info)}" if info.signatures else ""
    typer.echo(f"pushed {info.ref} ({info.kind}, {info.size_bytes / 1024:.1f} KiB, manifest {info.manifest_sha256[:12]}{signed})")


@app.command()
def pull(
    ref: str = typer.Argument(..., help="[namespace/]name[@version|@alias]"),
    dest: Optional[Path] = typer.Option(
        None, "--dest", "-o", help="folder to write: new, empty, or an earlier pull of this module (default: the local cache)"
    ),
    force: bool = typer.Option(
        False, "--force", help="write the module's files into a --dest folder that holds other files (those are left alone)"
    ),
    with_parents: bool = typer.Option(
        False, "--with-parents", help="also pull every ancestor (manifest.parent), into DEST.parents/NAME@N beside --dest"
    ),
    trust: list[Path] = TrustOption,
    require_signed: bool = RequireSignedOption,
    registry: Optional[str] = RegistryOption,
) -> None:
    """Fetch a module into a local folder; every file is checked against its sha256.

    Nothing the pull did not write is ever deleted or overwritten without --force. With --trust,
    signatures by those keys are verified before anything is fetched. A module trained on top of
    another is pulled only when its whole lineage resolves (see `tunehub lineage`)."""
    module = _registry(registry, trust, require_signed).pull(ref, dest, force=force, with_parents=with_parents)
    typer.echo(f"pulled {module.ref} to {module.path}")
    for parent in module.parents:
        typer.echo(f"pulled parent {parent.ref} to {parent.path}")


@app.command("ls")
def list_modules(
    base: Optional[str] = typer.Option(None, help="base model id or fingerprint prefix"),
    kind: Optional[str] = typer.Option(None, help="module kind, e.g. lora"),
    task: Optional[str] = typer.Option(None, help="task name"),
    registry: Optional[str] = RegistryOption,
    as_json: bool = JsonOption,
) -> None:
    """List modules (their latest version), optionally filtered."""
    infos = _registry(registry).list(base=base, kind=kind, task=task)
    if as_json:
        _echo_json([i.to_dict() for i in infos])
    elif not infos:
        typer.echo("no modules")
    else:
        _version_table(infos, "modules")


@app.command()
def versions(
    name: str = typer.Argument(..., help="[namespace/]name"),
    registry: Optional[str] = RegistryOption,
    as_json: bool = JsonOption,
) -> None:
    """List every version of a module with its aliases."""
    infos = _registry(registry).versions(name)
    if as_json:
        _echo_json([i.to_dict() for i in infos])
    else:
        _version_table(infos, name)


@app.command()
def promote(
    ref: str = typer.Argument(..., help="the version to point at, e.g. acme/sum@3"),
    alias: str = typer.Argument(..., help="the alias to move, e.g. prod"),
    registry: Optional[str] = RegistryOption,
) -> None:
    """Point ALIAS at the version REF resolves to (recorded, so it can be rolled back)."""
    move = _registry(registry).promote(ref, alias)
    origin = f"{move.from_version}" if move.from_version is not None else "unset"
    typer.echo(f"{alias}: {origin} -> {move.to_version}")


@app.command()
def rollback(
    name: str = typer.Argument(..., help="[namespace/]name"),
    alias: str = typer.Argument(..., help="the alias to move back"),
    registry: Optional[str] = RegistryOption,
) -> None:
    """Point ALIAS back at the target it had before its last move."""
    move = _registry(registry).rollback(name, alias)
    typer.echo(f"{alias}: {move.from_version} -> {move.to_version} (rolled back)")


@app.command()
def history(
    name: str = typer.Argument(..., help="[namespace/]name"),
    alias: Optional[str] = typer.Option(None, help="only this alias"),
    registry: Optional[str] = RegistryOption,
) -> None:
    """Show every recorded alias move: who, when, from, to."""
    moves = _registry(registry).alias_history(name, alias)
    if not moves:
        typer.echo("no alias moves")
    for move in moves:
        typer.echo(f"{move.at}  {move.by}  {move.action}  {move.alias}: {move.from_version} -> {move.to_version}")


@app.command()
def yank(
    ref: str = typer.Argument(..., help="name@version"),
    reason: str = typer.Option("", "--reason", help="why, shown to whoever asks for it"),
    force: bool = typer.Option(False, "--force", help="yank it even though modules trained on top of it are not yanked"),
    registry: Optional[str] = RegistryOption,
) -> None:
    """Hide a version from resolution; its record and files stay."""
    info = _registry(registry).yank(ref, reason, force=force)
    typer.echo(f"yanked {info.ref}")


@app.command("rm")
def remove(
    ref: str = typer.Argument(..., help="name@version, or a bare name for every version"),
    force: bool = typer.Option(
        False,
        "--force",
        help="also drop aliases pointing at what is deleted, and delete it even though modules trained on top of it are not yanked",
    ),
    registry: Optional[str] = RegistryOption,
) -> None:
    """Delete a version, or a whole module. Version numbers are never reused."""
    deleted = _registry(registry).delete(ref, force=force)
    typer.echo(f"deleted {ref.split('@')[0]} versions {', '.join(map(str, deleted))}")


@app.command()
def gc(
    registry: Optional[str] = RegistryOption,
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of lines"),
) -> None:
    """Remove blobs no version references and files left by killed pushes and promotes."""
    removed = _registry(registry).gc()
    if as_json:
        _echo_json(removed)
        return
    for digest in removed["blobs"]:
        typer.echo(f"removed blob {digest}")
    for path in removed["tmp"]:
        typer.echo(f"removed temporary file {path}")
    typer.echo(f"gc: {len(removed['blobs'])} blobs, {len(removed['tmp'])} temporary files removed")


@app.command()
def show(
    ref: str = typer.Argument(..., help="[namespace/]name[@version|@alias]"),
    trust: list[Path] = TrustOption,
    registry: Optional[str] = RegistryOption,
) -> None:
    """Print a module's manifest (JSON) after checking it against its hash, with who signed it
    and its lineage (the parent chain); with --trust the signatures are verified."""
    reg = _registry(registry)
    info = reg.resolve(ref)
    manifest = reg.manifest(info.ref)
    payload = json.loads(manifest.to_json())
    payload["_registry"] = {"ref": info.ref, "aliases": list(info.aliases), "yanked": info.yanked, "uri": reg.uri}
    payload["_provenance"] = reg.provenance(info.ref, trust or None)
    _echo_json(payload)


@app.command()
def export(
    ref: str = typer.Argument(..., help="[namespace/]name[@version|@alias], or a module folder (./path)"),
    out: Path = typer.Option(..., "--out", "-o", help="folder to write: new or empty (never overwritten)"),
    base: str = typer.Option(..., "--base", help="the base model folder the module was trained on"),
    merge: bool = typer.Option(False, "--merge", help="write a standalone transformers model with the module merged in"),
    as_lora: bool = typer.Option(False, "--as-lora", help="write a plain PEFT LoRA module (SVD of the exact weight deltas)"),
    rank: Optional[int] = typer.Option(None, "--rank", help="--as-lora: the LoRA's rank (default: the module's own, else 16)"),
    trust: list[Path] = TrustOption,
    require_signed: bool = RequireSignedOption,
    registry: Optional[str] = RegistryOption,
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Export a module for servers that read plain models and LoRA adapters only (vLLM, LoRAX, TGI)."""
    from tunehub.sdk.export import export_as_lora, export_merged
    from tunehub.sdk.registry import trust_policy

    if merge == as_lora:
        raise typer.BadParameter("choose one of --merge and --as-lora")
    if merge and rank is not None:
        raise typer.BadParameter("--rank goes with --as-lora (a merge is exact)", param_hint="--rank")
    policy = trust_policy(trust or None, require_signed)
    if merge:
        report = export_merged(ref, out, base, registry=registry, trust=policy)
    else:
        report = export_as_lora(ref, out, base, rank=rank, registry=registry, trust=policy)
    if as_json:
        _echo_json(report.to_dict())
        return
    if report.mode == "merge":
        typer.echo(f"merged {' -> '.join(report.chain)} into {report.base}: {report.dtype} transformers model in {report.out}")
        typer.echo(
            f"check: logits max |difference| vs the unmerged module {report.max_logit_diff:.3g}"
            f" (tolerance {report.tolerance:.3g}) on {sum(map(len, report.token_ids))} token ids"
        )
    elif not report.layer_errors:
        typer.echo(f"{report.module} is a LoRA module: copied as it is to {report.out}")
    else:
        worst = sorted(report.layer_errors.items(), key=lambda item: -item[1])
        typer.echo(f"wrote a rank-{report.rank} LoRA of {report.module} ({report.kind}) to {report.out}")
        typer.echo(
            f"error ||dW - BA|| / ||dW||: max {report.max_error:.3g}, mean {report.mean_error:.3g} over {len(worst)} layers"
        )
        for name, error in worst[:10]:
            typer.echo(f"  {name}  {error:.3g}")
        if len(worst) > 10:
            typer.echo(f"  ... {len(worst) - 10} more layers (--json lists them all)")
        tokens = sum(map(len, report.token_ids))
        typer.echo(f"logits: max |difference| vs the module {report.max_logit_diff:.3g} on {tokens} token ids")
    for note in report.notes:
        typer.echo(f"note: {note}")


@app.command()
def lineage(
    ref: str = typer.Argument(..., help="[namespace/]name[@version|@alias]"),
    registry: Optional[str] = RegistryOption,
    as_json: bool = JsonOption,
) -> None:
    """Show the chain a module was trained on, child first (ref, kind, task/objective, base,
    created), and the modules trained on top of it (used by)."""
    reg = _registry(registry)
    chain = reg.lineage(ref)
    used_by = reg.children(chain[0].ref)
    if as_json:
        _echo_json({"lineage": [i.to_dict() for i in chain], "used_by": [i.to_dict() for i in used_by]})
        return
    for info in chain:
        note = f"  yanked: {info.yank_reason or 'no reason given'}" if info.yanked else ""
        purpose = f"{info.task or '-'}/{info.objective or '-'}"
        typer.echo(f"{info.ref}  {info.kind}  {purpose}  {info.base_model_id}  {info.created_at}{note}")
    typer.echo(f"used by: {', '.join(i.ref + (' (yanked)' if i.yanked else '') for i in used_by) or 'none'}")


@app.command("inspect")
def inspect_command(
    ref: str = typer.Argument(..., help="[namespace/]name[@version|@alias], or a module folder"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write each layer's singular value spectrum to this PNG"),
    trust: list[Path] = TrustOption,
    require_signed: bool = RequireSignedOption,
    registry: Optional[str] = RegistryOption,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object with everything"),
) -> None:
    """Show what a module is (manifest, lineage, parameters) and, for lora/dora/adalora, each
    layer's singular values and effective rank: how much of its rank the delta uses.

    A reference is pulled, verified, into the registry's cache (with --trust, its signatures are
    checked first); a folder is verified in place. Nothing of yours is written but --plot."""
    from tunehub.sdk.inspect import inspect_module, layer_table, plot_spectrum, rank_summary, summary_lines

    report = inspect_module(ref, registry=registry, trust=trust or None, require_signed=require_signed)
    written = plot_spectrum(report, plot) if plot is not None else None
    if as_json:
        _echo_json({**report.to_dict(), "plot": str(written) if written else None})
        return
    for line in summary_lines(report):
        typer.echo(line)
    header, rows = layer_table(report)
    _rows_table(header, rows, f"{report.label}: {'layers' if report.layers else 'tensors by layer kind'}")
    for line in filter(None, [rank_summary(report), *report.notes]):
        typer.echo(line)
    if written:
        typer.echo(f"wrote the spectrum plot to {written}")


@app.command()
def sign(
    ref: str = typer.Argument(..., help="[namespace/]name[@version|@alias]"),
    key: Path = typer.Option(..., "--key", help="EC private key (PEM); tunehub keygen makes one"),
    registry: Optional[str] = RegistryOption,
) -> None:
    """Sign an existing version (its files, manifest included) and store the signature beside it."""
    info = _registry(registry).sign(ref, key)
    typer.echo(f"signed {info.ref} (signatures: {_signers(info)})")


@app.command()
def verify(
    ref: str = typer.Argument(..., help="[namespace/]name[@version|@alias]"),
    trust: list[Path] = typer.Option(..., "--trust", help="a trusted public key (PEM file or folder); repeat for more"),
    export: Optional[Path] = typer.Option(
        None, "--export", help="also write the verified signature as a model_signing .sig file (new file only)"
    ),
    registry: Optional[str] = RegistryOption,
) -> None:
    """Check that a version is signed by a trusted key and that its files still match the signature."""
    from tunehub.registry.signing import short_key_id

    reg = _registry(registry)
    info = reg.resolve(ref)
    provenance = reg.verify(info.ref, trust, export=export)
    signers = ", ".join(short_key_id(k) for k in provenance.verified)
    typer.echo(f"verified {info.ref}: signed by {signers}; every file matches the signature")


@app.command()
def keygen(
    key: Path = typer.Argument(..., help="where to write the private key (PEM, mode 0600); the public key goes to KEY.pub"),
) -> None:
    """Make a signing key pair (elliptic curve P-256) for push --sign, sign and --trust."""
    from tunehub.registry.signing import generate_key_pair, short_key_id

    key_id = generate_key_pair(key)
    typer.echo(f"wrote {key} (private: keep it secret) and {key}.pub (share it; --trust takes it); key {short_key_id(key_id)}")


def _list_methods() -> None:
    """One line per training method: what it trains, 4-bit base or not, mixed by the engine or not."""
    from tunehub.registry.manifest import ModuleKind
    from tunehub.server.engine.kinds import discover, served_kind
    from tunehub.trainer.methods import method_table

    discover()
    rows = method_table()
    width = max(len(row["method"]) for row in rows)  # method and kind share names: one width for both
    for row in rows:
        group = served_kind(ModuleKind(row["kind"]))
        if group is None:
            mixed = "not mixed (serve as a base)"
        else:
            mixed = f"mixed: {group.mixes_only}" if group.mixes_only else "mixed in batches"
        base = "4-bit base ok" if row["4bit_base"] else "no 4-bit base"
        typer.echo(f"{row['method']:<{width}} {row['kind']:<{width}} {base:<14} {mixed:<28} {row['trains']}")


@app.command()
def train(
    config: Optional[Path] = typer.Argument(None, help="run YAML (base, method, objective, data, training, output)"),
    overrides: list[str] = typer.Option([], "--set", help="override a key: --set training.max_steps=50"),
    resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint in output.dir"),
    push_to: Optional[str] = typer.Option(None, "--push", help="push the module to this name when done"),
    sign: Optional[Path] = typer.Option(None, "--sign", help="sign the pushed version with this EC private key (PEM)"),
    trust: list[Path] = TrustOption,
    require_signed: bool = RequireSignedOption,
    registry: Optional[str] = RegistryOption,
    check: bool = typer.Option(False, "--check", help="validate the config and stop"),
    list_methods: bool = typer.Option(False, "--list-methods", help="list the training methods and stop"),
) -> None:
    """Train a task module as the run YAML says. With --trust, init.parent (and its chain) must pass the policy."""
    from tunehub.sdk.registry import trust_policy
    from tunehub.trainer.config import load_run_config

    if list_methods:
        _list_methods()
        return
    if config is None:
        raise typer.BadParameter("give the run YAML (or --list-methods)", param_hint="CONFIG")

    policy = trust_policy(trust or None, require_signed)
    run_config = load_run_config(config, overrides)
    if check:
        typer.echo(f"{config}: valid ({run_config.method.name} / {run_config.objective.name})")
        return
    from tunehub.trainer.run import train as run_training

    result = run_training(run_config, resume=resume, push=push_to, registry=registry, trust=policy, sign=sign)
    _leave_process_group()
    if result.manifest is None:
        return  # not the main process of a distributed run
    m = result.metrics
    summary = f"train loss {m.get('final_train_loss', m['train_loss']):.4f}"
    if "eval_loss" in m:
        summary += f", eval loss {m['eval_loss']:.4f} (perplexity {m['eval_perplexity']:.2f})"
    typer.echo(f"module written to {result.module_dir}: {summary}, trainable {m['trainable_share']:.2%}")
    if result.pushed:
        typer.echo(f"pushed {result.pushed.ref}")


def _leave_process_group() -> None:
    """End the process group of a distributed run (accelerate launch), every process together once
    the main one has written the module: a process that exits with it still open can abort in
    gloo's threads at interpreter exit ("terminate called without an active exception"), which
    fails the whole launch."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@app.command()
def quickstart(
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="where everything is written (default ./tunehub-quickstart)"),
    keep: bool = typer.Option(False, "--keep", help="keep what an earlier run left in the work folder"),
    fast: bool = typer.Option(False, "--fast", help="smallest sizes (about 2 minutes); accuracy is not the point"),
) -> None:
    """Build a base, train UFT and SFT modules on it in 4-bit, version them, serve them, and check them."""
    from tunehub.sdk.quickstart import run_quickstart

    run_quickstart(workdir, fast=fast, keep=keep)


@app.command()
def compare(
    config: Optional[Path] = typer.Argument(None, help="comparison YAML: base, task, methods, steps, learning_rates, seed"),
    preset: Optional[str] = typer.Option(
        None, "--preset", help="a built-in config instead: quick (every method, under 15 minutes on 2 CPU cores)"
    ),
    out: Path = typer.Option(Path("tunehub-compare"), "--out", help="where everything is written: a new or empty folder"),
) -> None:
    """Train every fine-tuning method on one base and task, and measure them side by side."""
    from tunehub.errors import ConfigError
    from tunehub.sdk.compare import load_compare_config, preset_config, run_comparison

    if config is not None and preset is None:
        cfg, source = load_compare_config(config), str(config)
    elif preset is not None and config is None:
        cfg, source = preset_config(preset), f"--preset {preset}"
    else:
        raise ConfigError("give a comparison YAML or --preset quick (one of them)")
    report = run_comparison(
        cfg, out, command=f"tunehub compare {source} --out {out}", progress=lambda text: typer.echo(f"> {text}", err=True)
    )
    header, rows = report.table()
    _rows_table(header, rows, f"tunehub compare: {report.task}", left=frozenset({0, 1, len(header) - 1}))
    typer.echo(f"wrote {out / 'comparison.md'}, comparison.json and comparison.png; the modules are in {out / 'runs'}")


@base_app.command("init")
def base_init(
    path: Path = typer.Argument(..., help="folder to create"),
    preset: str = typer.Option("tiny", help="tiny, tiny-bert, small, bench-100m, bench-300m"),
    seed: int = typer.Option(0, help="weights and tokenizer are a function of preset and seed"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing folder"),
    tokenizer: Optional[Path] = typer.Option(
        None, "--tokenizer", help="use this tokenizer folder (tunehub tokenizer train): the vocabulary size follows it"
    ),
) -> None:
    """Build a small base model and its trained tokenizer from a preset (no download)."""
    from tunehub.registry.fingerprint import base_fingerprint
    from tunehub.trainer.base import build_base

    out = build_base(path, preset, seed=seed, overwrite=overwrite, tokenizer=tokenizer)
    vocab = ""
    if tokenizer is not None:
        vocab = f", tokenizer {tokenizer}, vocabulary {json.loads((out / 'config.json').read_text())['vocab_size']}"
    typer.echo(f"built {preset} base in {out} (fingerprint {base_fingerprint(out)[:12]}{vocab})")


@tokenizer_app.command("train")
def tokenizer_train(
    corpus: list[Path] = typer.Option(
        ..., "--corpus", help="UTF-8 text, one document per line (a file or folder); repeat for more"
    ),
    kind: str = typer.Option("bpe", "--type", help="bpe (byte-level), wordpiece (BERT) or unigram (SentencePiece-style)"),
    vocab_size: int = typer.Option(..., "--vocab-size", help="tokens in the vocabulary, special tokens included"),
    out: Path = typer.Option(..., "--out", "-o", help="folder to write: new or empty (never overwritten)"),
    min_frequency: int = typer.Option(2, "--min-frequency", help="bpe and wordpiece: merge pairs seen at least this often"),
) -> None:
    """Train a tokenizer for a new base (`tunehub base init --tokenizer DIR`), saved for transformers."""
    from tunehub.trainer.tokenizers import train_tokenizer

    result = train_tokenizer(corpus, kind, vocab_size, out, min_frequency=min_frequency)
    typer.echo(
        f"trained a {result.kind} tokenizer of {result.vocab_size} tokens on {result.lines} lines"
        f" ({result.corpus_bytes / 1024:.1f} KiB) in {out}"
    )


@tokenizer_app.command("extend")
def tokenizer_extend(
    base: str = typer.Option(..., "--base", help="the tokenizer to extend: a tokenizer or base model folder, or a Hub id"),
    corpus: list[Path] = typer.Option(
        ..., "--corpus", help="domain text, one document per line (a file or folder); repeat for more"
    ),
    max_new: int = typer.Option(..., "--max-new", help="most tokens to add"),
    out: Path = typer.Option(..., "--out", "-o", help="folder to write: new or empty (never overwritten)"),
    heldout: Optional[Path] = typer.Option(
        None, "--heldout", help="held-out domain text to measure on (default: 10% of the corpus's lines, kept apart)"
    ),
    init: str = typer.Option(
        "subword-mean",
        "--init",
        help="how a model's new rows start: subword-mean (mean of the token's old pieces) or mean (of all rows)",
    ),
    min_frequency: int = typer.Option(2, "--min-frequency", help="only words seen at least this often"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Add the domain words the base tokenizer splits worst; report fertility before and after."""
    from tunehub.trainer.tokenizers import EXTENSION_REPORT, extend_tokenizer

    report = extend_tokenizer(
        base, corpus, max_new, out, heldout=0.1 if heldout is None else heldout, init=init, min_frequency=min_frequency
    )
    if as_json:
        _echo_json(report.to_dict())
        return
    before, after = report.before, report.after
    rows = [
        ("tokens per word (fertility)", f"{before.fertility:.3f}", f"{after.fertility:.3f}", f"{report.fertility_ratio:.3f}"),
        (
            "bytes per token",
            f"{before.bytes_per_token:.3f}",
            f"{after.bytes_per_token:.3f}",
            f"{after.bytes_per_token / before.bytes_per_token:.3f}",
        ),
        ("tokens", str(before.tokens), str(after.tokens), f"{after.tokens / max(before.tokens, 1):.3f}"),
        ("round trip exact", "yes" if before.roundtrip else "no", "yes" if after.roundtrip else "no", ""),
    ]
    header = ("held-out text", "base", "extended", "after/before")
    typer.echo(
        f"added {len(report.added)} tokens ({report.base_vocab_size} -> {report.vocab_size}); top: "
        + ", ".join(repr(t.token) for t in report.added[:5])
    )
    _rows_table(header, rows, f"{before.lines} held-out lines, {before.words} words")
    typer.echo(f"wrote the tokenizer and {EXTENSION_REPORT} to {out}")


@template_app.command("init")
def template_init(
    path: Path = typer.Argument(..., help="module folder to write (new or empty)"),
    base: str = typer.Option(..., "--base", help="the base the template is for: a local folder or a Hub id"),
    text: Optional[str] = typer.Option(None, "--text", help="a text template with {slot} names ({{ }} for braces)"),
    chat: Optional[Path] = typer.Option(
        None, "--chat", help='a JSON file: [{"role": "system", "content": "..."}, {"role": "user", "content": "... {slot}"}]'
    ),
    task: Optional[str] = typer.Option(None, "--task", help="what the template is for (recorded in the manifest)"),
) -> None:
    """Write a hard-prompt template as a module; push it, then request it by name with the slot values."""
    from tunehub.bases import resolve_base_folder
    from tunehub.errors import ConfigError
    from tunehub.registry.template import parse_template
    from tunehub.trainer.templates import write_template_module

    if (text is None) == (chat is None):
        raise ConfigError("give the template as --text TEXT or --chat FILE (one of them)")
    if text is not None:
        raw = json.dumps({"format": "text", "text": text})
    else:
        assert chat is not None
        try:
            messages = json.loads(chat.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--chat {chat}: not a readable JSON file ({exc})") from None
        raw = json.dumps({"format": "chat", "messages": messages})
    template = parse_template(raw, "the template")
    manifest = write_template_module(path, template, resolve_base_folder(base, field="--base"), task=task)
    slots = ", ".join(template.slots) or "none"
    typer.echo(f"wrote {manifest.kind.value} module {path} ({template.format}; slots: {slots})")


@hub_app.command("serve")
def hub_serve(
    root: Path = typer.Option(..., "--root", help="folder that holds the hub's repos (created if missing)"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on"),
    port: int = typer.Option(8787, "--port", help="port to listen on (0 picks a free one)"),
    token_file: Optional[Path] = typer.Option(
        None,
        "--token-file",
        help="accepted tokens, one per line, or YAML with scopes per namespace (see README); without it anyone may write",
    ),
    max_body_bytes: int = typer.Option(1 << 30, "--max-body-bytes", help="largest request body accepted (413 beyond)"),
    verbose: bool = typer.Option(False, "--verbose", help="log every request to stderr"),
) -> None:
    """Serve a local folder over the Hugging Face Hub HTTP API (clients set HF_ENDPOINT and HF_HUB_DISABLE_XET=1)."""
    from tunehub.registry.hub_server import serve

    serve(
        root, host=host, port=port, token_file=token_file, max_body_bytes=max_body_bytes, verbose=verbose, announce=typer.echo
    )  # where it listens, on stdout (scripts read the URL from it)


@app.command()
def serve(
    base: str = typer.Option(..., "--base", help="base model: a local folder or a Hub id"),
    quantization: str = typer.Option("nf4", "--quantization", help="nf4 (4-bit), int8 or none"),
    registry: Optional[str] = RegistryOption,
    tenants: Optional[Path] = typer.Option(
        None, "--tenants", help="tenants YAML (hashed keys, models, limits); without it: one open tenant, loopback only"
    ),
    pool_bytes: int = typer.Option(1 << 30, "--pool-bytes", help="byte budget of the resident modules (LRU beyond)"),
    max_batch: int = typer.Option(16, "--max-batch", help="most requests decoded together"),
    join_steps: int = typer.Option(
        8, "--join-steps", help="decode steps a ready request may wait to join with others (throughput); 0: at once (latency)"
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="127.0.0.1, 0.0.0.0 or :: (the last two need --tenants)"),
    port: int = typer.Option(8000, "--port", help="port to listen on"),
    admin_key_file: Optional[Path] = typer.Option(
        None, "--admin-key-file", help="file holding the admin key (or sha256:<hex>); enables /admin/*"
    ),
    max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes", help="largest request body accepted (413 beyond)"),
    alias_ttl: float = typer.Option(5.0, "--alias-ttl", help="seconds before an alias (prod, latest) is resolved again"),
    audit_log: Optional[str] = typer.Option(None, "--audit-log", help="file for the JSON audit lines (default: stderr)"),
    log_level: str = typer.Option("warning", "--log-level", help="LitServe/uvicorn log level"),
    trust: list[Path] = typer.Option(
        [],
        "--trust",
        help="a trusted public key (PEM file, or a folder of *.pem/*.pub): its signatures are verified at load; repeat for more",
    ),
    require_signed: bool = typer.Option(
        False, "--require-signed", help="refuse (403) modules without a valid signature by a --trust key"
    ),
    ray: bool = typer.Option(
        False, "--ray", help="run on Ray Serve (a local Ray cluster): --replicas engines behind one ingress; needs tunehub[ray]"
    ),
    replicas: Optional[int] = typer.Option(
        None, "--replicas", help="with --ray: how many engines (replicas) serve, each with its own pool (default 2)"
    ),
) -> None:
    """Serve every module of the registry from one base over an OpenAI-compatible HTTP API.

    With --ray, the same server runs as a Ray Serve application on a local Ray cluster: --replicas
    copies of the engine behind one ingress, each request routed to a replica that holds its
    module unless that one is busy (README: "Many replicas: Ray Serve").

    With --trust, every module load verifies the signatures by those keys (a version whose files
    changed after signing is refused); with --require-signed, unsigned modules and modules signed
    only by other keys are refused too. Tenants may require signatures per namespace
    (require_signed_by in the tenants file)."""
    from dataclasses import asdict

    from tunehub.errors import ConfigError
    from tunehub.server.serve import RayOptions, ServeConfig
    from tunehub.server.serve import serve as run_server

    if replicas is not None and not ray:
        raise ConfigError("--replicas needs --ray (the LitServe server runs one engine)")

    config = ServeConfig(
        base=base,
        quantization=quantization,
        registry=registry,
        tenants=str(tenants) if tenants else None,
        pool_bytes=pool_bytes,
        max_batch=max_batch,
        join_steps=join_steps,
        host=host,
        port=port,
        admin_key_file=str(admin_key_file) if admin_key_file else None,
        max_body_bytes=max_body_bytes,
        alias_ttl_s=alias_ttl,
        audit_log=audit_log,
        log_level=log_level,
        trust=[str(path) for path in trust],
        require_signed=require_signed,
        # process-wide choices belong to the serve entry point: glibc keeps freed memory for the
        # next decode step in the inference worker when the base is on the CPU
        cpu_allocator="auto",
        ray=asdict(RayOptions(replicas=2 if replicas is None else replicas)) if ray else None,
    )
    raise typer.Exit(run_server(config))


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="the prompt (with --chat: the user's message)"),
    url: str = typer.Option("http://127.0.0.1:8000", "--url", envvar="TUNEHUB_URL", help="the tunehub server"),
    model: str = typer.Option(..., "--model", "-m", help="module reference (acme/sum@prod) or the base's name"),
    chat: bool = typer.Option(False, "--chat", help="use the chat endpoint (the base's chat template)"),
    stream: bool = typer.Option(False, "--stream", help="print tokens as they come"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="most tokens to generate"),
    # greedy by default: a module's answer, not a sample (OpenAI's API defaults to 1)
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy (the default); > 0 samples"),
    seed: Optional[int] = typer.Option(None, "--seed", help="sampling seed"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="TUNEHUB_API_KEY", help="tenant API key"),
) -> None:
    """Ask a running `tunehub serve` for a completion; the module version that answered goes to stderr."""
    from tunehub.sdk.client import Client

    options: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
    with Client(url, api_key) as client:
        if stream:
            printed = ""
            with client.stream_chat(model, prompt, **options) if chat else client.stream_complete(model, prompt, **options) as s:
                for chunk in s:
                    typer.echo(chunk.text, nl=False)
                    printed = (printed + chunk.text)[-1:]
            if printed != "\n":
                typer.echo()
            result = s.completion
        else:
            result = client.chat(model, prompt, **options) if chat else client.complete(model, prompt, **options)
            # the text as it came, ending with exactly one newline (a module's answer often has one)
            typer.echo(result.text, nl=not result.text.endswith("\n"))
    fingerprint = (result.base_fingerprint or "")[:12]
    typer.echo(
        f"[{result.model}, base {fingerprint}, {result.finish_reason}, {result.prompt_tokens} prompt +"
        f" {result.completion_tokens} completion tokens]",
        err=True,
    )


@tenants_app.command("hash-key")
def tenants_hash_key(
    key: Optional[str] = typer.Argument(None, help="the key to hash, '-' to read it from stdin; omit to make a new key"),
) -> None:
    """Print the sha256 form of an API key for a tenants file (or make a new key and print both)."""
    from tunehub.server.tenants import hash_key, new_key

    if key is None:
        key = new_key()
        typer.echo(f"key:  {key}")
        typer.echo(f"hash: {hash_key(key)}")
        return
    if key == "-":
        key = sys.stdin.readline().strip()
    if not key:
        raise typer.BadParameter("the key is empty")
    typer.echo(hash_key(key))


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning every error into one line on stderr.

    Usage errors are typer's own (message and exit code 2); tunehub's typed errors become
    ``error: ...`` and their ``exit_code``."""
    try:
        app(args=argv, prog_name="tunehub", standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except TunehubError as exc:
        typer.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except Exception as exc:  # never a traceback for users; TUNEHUB_DEBUG=1 shows it
        if os.environ.get("TUNEHUB_DEBUG"):
            raise
        kind = "" if isinstance(exc, (OSError, ValueError)) else f"unexpected {type(exc).__name__}: "
        typer.echo(f"error: {kind}{exc}", err=True)
        return 1
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
