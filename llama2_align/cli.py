"""The ``llama2-align`` command line (also ``python -m llama2_align`` and ``python -m llama2_align.cli``).

Every command is one function that parses its options, calls the library and prints; no logic lives here.
Heavy modules (torch, transformers) are imported inside the commands that need them, so ``--help`` and the data
commands start instantly.

Expected user errors (a missing file, a bad record, an unknown preset) print one clear message on stderr and exit
with a documented code; a traceback means a bug.
"""

import json
import os
from pathlib import Path
from typing import Annotated, Literal, NoReturn, Optional

import typer

from . import data as data_lib  # light: pydantic only, no torch

# Exit codes, shown in --help. Click's own usage errors (unknown option, invalid choice) also exit 2.
EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2

EXIT_CODES_HELP = (
    "Exit codes: 0 success; "
    "1 an input was missing or refused (bad data records, not a Meta checkpoint, a non-empty output, ...); "
    "2 usage error (unknown option, preset, kind or format)."
)

# Panels that group the commands in `llama2-align --help`.
MODEL_PANEL = "Model"
DATA_PANEL = "Data"
PIPELINE_PANEL = "Pipeline"

KindName = Literal[data_lib.KINDS]  # sft, preference, prompts, eval
FormatName = Literal[data_lib.FORMATS]  # auto, native, hh-rlhf, pku-saferlhf
ConvertDtype = Literal["fp32", "bf16", "fp16"]
ExportFormatName = Literal["hf", "gguf"]
GgufTypeName = Literal["f16", "q8_0"]
ExportDtype = Literal["auto", "fp32", "bf16", "fp16"]

app = typer.Typer(
    name="llama2-align",
    help="Align Llama 2 the way Meta aligned Llama 2-Chat: SFT, helpfulness and safety reward models, PPO, "
         "evaluation.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # a bug's traceback must not dump tensors or configs
    context_settings={"help_option_names": ["-h", "--help"]},
)
data_app = typer.Typer(
    help="Validate data sets and write the demo world's data sets.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(data_app, name="data", rich_help_panel=DATA_PANEL)


def fail(message: str, code: int = EXIT_REFUSED) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code`` (no traceback)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def require_checkpoint_dir(path: str | Path, label: str = "") -> None:
    """Exit 1 unless ``path`` is a directory, saying whether it is missing or a file (``label``: which one)."""
    path = Path(path)
    if not path.is_dir():
        fail(f"{path}: " + ("a file; expected a checkpoint directory" if path.exists()
                            else "no such checkpoint directory") + (f" ({label})" if label else ""))


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in counts.items()) or "-"


# --------------------------------------------------------------------------------------------------------------
# model-info
# --------------------------------------------------------------------------------------------------------------


def _memory(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:,.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:,.1f} MiB"


@app.command("model-info", rich_help_panel=MODEL_PANEL, epilog=EXIT_CODES_HELP)
def model_info(
    preset: Annotated[Optional[str], typer.Option(
        "--preset", "-p", help="A model preset: llama2-7b, llama2-13b, llama2-70b, small, tiny, micro. "
                               "Without it: one line per preset.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the description as JSON.")] = False,
) -> None:
    """Describe a model preset: shapes, parameter count, attention (MHA/GQA), bf16 weight memory."""
    from .model import PRESETS, describe_preset, format_preset_table, human_count  # imports torch: only here

    if preset is None:
        infos = [describe_preset(name) for name in PRESETS]
        if as_json:
            typer.echo(json.dumps(infos, indent=2))
            return
        for info in infos:
            typer.echo(f"{info['preset']:<12}{info['parameters']:>16,}  {human_count(info['parameters']):>9}  "
                       f"{info['attention']:<17}{_memory(info['weights_bf16_bytes']):>11} bf16")
        return
    if preset not in PRESETS:
        fail(f"unknown preset {preset!r}; available presets: {', '.join(PRESETS)}", EXIT_USAGE)
    info = describe_preset(preset)
    typer.echo(json.dumps(info, indent=2) if as_json else format_preset_table(info))


# --------------------------------------------------------------------------------------------------------------
# data validate / data demo
# --------------------------------------------------------------------------------------------------------------


def _bad_records_report(err: "data_lib.DataValidationError", path: Path) -> str:
    issues = err.issues
    records = {(i.path, i.line) for i in issues if i.line is not None}
    whole_file = any(i.line is None for i in issues)
    parts = ([_plural(len(records), "bad record")] if records else []) + (["the whole file"] if whole_file else [])
    return f"{path}: {_plural(len(issues), 'problem')} in {' and '.join(parts)}; nothing was loaded"


@data_app.command("validate", epilog=EXIT_CODES_HELP)
def data_validate(
    path: Annotated[Path, typer.Argument(help="A .jsonl/.ndjson, .json (a list) or .parquet file.",
                                         metavar="PATH", show_default=False)],
    kind: Annotated[KindName, typer.Option("--kind", "-k", help="What the file holds.", show_default=False)],
    format: Annotated[FormatName, typer.Option(
        "--format", "-f", help="native, a public data set's own format (preference only), or auto-detect.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Validate a data set against its contract (data_specs/README.md) and summarise it.

    Every bad record is printed on stderr as FILE:LINE: FIELD: expected ..., followed by a count line.
    """
    if not path.exists():
        fail(f"{path}: no such file")
    if path.is_dir():
        fail(f"{path}: is a directory; give a .jsonl, .json or .parquet file")
    try:
        records = data_lib.read_records(path, kind, format=format)
    except data_lib.DataValidationError as err:
        for issue in err.issues:  # all of them: the exception's message stops at 50
            typer.echo(str(issue), err=True)
        typer.echo(_bad_records_report(err, path), err=True)
        raise typer.Exit(EXIT_REFUSED) from None
    except ValueError as err:  # unsupported file type, an adapter format for a kind it does not hold
        fail(str(err), EXIT_USAGE)
    except OSError as err:
        fail(f"{path}: {err.strerror or err}")

    summary = data_lib.summarize(records, kind)
    if as_json:
        typer.echo(json.dumps({"path": str(path), "format": format, **summary}, indent=2))
        return
    typer.echo(f"{path}: OK, {_plural(summary['records'], 'record')} of kind {kind}")
    typer.echo(f"  by category:       {_counts(summary['by_category'])}")
    if "by_rating" in summary:
        typer.echo(f"  by rating:         {_counts(summary['by_rating'])}")
    if "by_harm_category" in summary:
        typer.echo(f"  by harm category:  {_counts(summary['by_harm_category'])}")


@data_app.command("demo", epilog=EXIT_CODES_HELP)
def data_demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write the four JSONL files into.",
                                      show_default=False)],
    seed: Annotated[int, typer.Option("--seed", help="World seed: the same seed writes byte-identical files.")] = 0,
    micro: Annotated[bool, typer.Option("--micro", help="Tiny sizes (for tests and quick looks).")] = False,
) -> None:
    """Write the built-in demo world's data sets: sft, preference, prompts (PPO) and eval (held out)."""
    from .demo_world import DemoSizes, write_demo_datasets

    if out.exists() and not out.is_dir():
        fail(f"{out}: exists and is not a directory")
    sizes = DemoSizes.micro() if micro else DemoSizes()
    try:
        paths = write_demo_datasets(out, seed=seed, sizes=sizes)
    except OSError as err:
        fail(f"cannot write to {out}: {err.strerror or err}")
    typer.echo(f"demo world (seed {seed}{', micro sizes' if micro else ''}) written to {out}:")
    width = max(len(k) for k in paths)
    for kind, file in paths.items():
        with open(file, encoding="utf-8") as fh:
            n = sum(1 for line in fh if line.strip())
        typer.echo(f"  {kind:<{width}}  {_plural(n, 'record'):>14}  {file}")


# --------------------------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------------------------


@app.command("convert", rich_help_panel=MODEL_PANEL, epilog=EXIT_CODES_HELP)
def convert(
    meta_dir: Annotated[Path, typer.Argument(
        help="Meta-format checkpoint: params.json, consolidated.NN.pth shards, tokenizer.model.",
        metavar="META_DIR", show_default=False)],
    out_dir: Annotated[Path, typer.Argument(help="HF-format directory to write.", metavar="OUT_DIR",
                                             show_default=False)],
    dtype: Annotated[ConvertDtype, typer.Option("--dtype", help="Weight dtype of the HF directory.")] = "fp32",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT_DIR if it is not empty.")] = False,
) -> None:
    """Convert a Meta-format Llama 2 checkpoint into an HF directory that plain transformers loads."""
    if not meta_dir.is_dir():
        fail(f"{meta_dir}: no such directory (expected a Meta-format checkpoint)")
    if not (meta_dir / "params.json").is_file():
        fail(f"{meta_dir}: not a Meta-format checkpoint: no params.json "
             "(expected params.json, consolidated.NN.pth shards and tokenizer.model)")
    if out_dir.resolve() == meta_dir.resolve() or meta_dir.resolve().is_relative_to(out_dir.resolve()):
        fail(f"{out_dir}: would replace the checkpoint being converted; choose another OUT_DIR", EXIT_USAGE)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        fail(f"{out_dir}: exists and is not empty; pass --overwrite to replace it")

    from . import meta_format  # imports torch: only here

    try:
        if hasattr(meta_format, "convert_command"):
            typer.echo(meta_format.convert_command(meta_dir, out_dir, dtype=dtype))
        else:
            written = meta_format.convert_meta_to_hf(meta_dir, out_dir, dtype=dtype)
            typer.echo(f"converted {meta_dir} -> {written}")
    except (ValueError, OSError) as err:  # MetaCheckpointError is a ValueError
        fail(f"cannot convert {meta_dir}: {err}")
    except RuntimeError as err:  # weights that do not match params.json (load_state_dict)
        fail(f"cannot convert {meta_dir}: the weights do not match params.json: {err}")


# --------------------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------------------


@app.command("export", rich_help_panel=MODEL_PANEL, epilog=EXIT_CODES_HELP)
def export(
    checkpoint: Annotated[Path, typer.Argument(
        help="Policy checkpoint: an HF directory, a saved LoRA adapter (merged into its base) or a Meta-format "
             "directory, e.g. runs/demo/ppo/final.", metavar="CHECKPOINT", show_default=False)],
    out: Annotated[Path, typer.Argument(
        help="hf: the directory to write; gguf: the .gguf file to write.", metavar="OUT", show_default=False)],
    format: Annotated[ExportFormatName, typer.Option(
        "--format", "-f", help="hf: one plain HF directory; gguf: one file for llama.cpp.")] = "hf",
    gguf_type: Annotated[GgufTypeName, typer.Option(
        "--gguf-type", help="GGUF weight type: f16, or q8_0 (8-bit blocks of 32; norms stay f32).")] = "f16",
    dtype: Annotated[ExportDtype, typer.Option(
        "--dtype", help="hf: weight dtype; auto keeps the dtype the base weights were saved in.")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists and is not empty.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was written as JSON.")] = False,
) -> None:
    """Export a policy checkpoint for shipping: a plain HF directory, or a GGUF file for llama.cpp (Ollama, LM
    Studio), each with the tokenizer and the Llama 2 chat template."""
    require_checkpoint_dir(checkpoint)
    if format == "gguf" and out.suffix != ".gguf":
        fail(f"{out}: with --format gguf, OUT is the file to write and its name ends in .gguf "
             f"(e.g. {out.with_suffix('.gguf').name})", EXIT_USAGE)
    if out.resolve() == checkpoint.resolve() or checkpoint.resolve().is_relative_to(out.resolve()):
        fail(f"{out}: would replace the checkpoint being exported; choose another OUT", EXIT_USAGE)
    if format == "gguf" and out.is_dir():
        fail(f"{out}: is a directory; with --format gguf, OUT is the .gguf file to write")
    if out.exists() and not overwrite and (format == "gguf" or not out.is_dir() or any(out.iterdir())):
        fail(f"{out}: exists{'' if format == 'gguf' else ' and is not empty'}; pass --overwrite to replace it")

    from .export import ExportError, export_checkpoint  # imports torch: only here

    try:
        path, meta = export_checkpoint(checkpoint, out, format=format, gguf_type=gguf_type, dtype=dtype,
                                       overwrite=overwrite)
    except ImportError as err:
        fail(f"cannot export: {err}")
    except (ExportError, FileNotFoundError) as err:  # their messages name the file
        fail(str(err))
    except (ValueError, OSError) as err:  # a model directory transformers or peft refuses
        fail(f"cannot export {checkpoint}: {err}")
    if as_json:
        typer.echo(json.dumps(meta, indent=2))
        return
    merged = f", {_plural(meta['merged_adapters'], 'LoRA adapter')} merged" if meta["merged_adapters"] else ""
    typer.echo(f"exported {checkpoint} -> {path} ({format}{merged})")
    if format == "hf":
        typer.echo(f"  {meta['dtype']} weights, {meta['bytes'] / 2**20:,.1f} MiB; tokenizer and Llama 2 chat template")
    else:
        types = ", ".join(f"{k} {v}" for k, v in meta["tensor_types"].items())
        typer.echo(f"  {gguf_type}: {meta['tensors']} tensors ({types}), {meta['bytes'] / 2**20:,.1f} MiB; "
                   f"{meta['tokens']:,} tokens and the Llama 2 chat template")
        if meta["f16_fallback"]:
            typer.echo(f"  kept in f16 (rows not a multiple of 32): {', '.join(meta['f16_fallback'])}")


# --------------------------------------------------------------------------------------------------------------
# Pipeline commands that need no Prefect: eval, chat (``run`` and the other flow commands are in flows/cli.py)
# --------------------------------------------------------------------------------------------------------------


@app.command("plan", rich_help_panel=PIPELINE_PANEL, epilog=EXIT_CODES_HELP)
def plan(
    preset: Annotated[str, typer.Option(
        "--preset", help="Pipeline preset: demo-tiny, demo-micro, llama2-7b-lora, llama2-7b, llama2-13b-lora, "
                         "llama2-70b-lora.")],
    gpus: Annotated[int, typer.Option("--gpus", help="GPUs per node.", min=1)] = 1,
    gpu_memory: Annotated[str, typer.Option("--gpu-memory", help="Memory of one GPU: 80GiB, 141GB, 40G, ...")
                          ] = "80GiB",
    nodes: Annotated[int, typer.Option("--nodes", help="Nodes (world size = nodes x gpus).", min=1)] = 1,
    config: Annotated[Optional[Path], typer.Option(
        "--config", help="JSON or YAML file with pipeline fields (as for `run`).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Override a field, e.g. --set ppo.micro_batch_size=4 (repeatable).")] = None,
    rejection_sampling: Annotated[Optional[bool], typer.Option(
        "--rejection-sampling/--no-rejection-sampling", help="Count rejection sampling (off by default).")] = None,
    prompt_tokens: Annotated[Optional[int], typer.Option(
        "--prompt-tokens", help="Longest prompt for PPO, rejection sampling and evaluation (default: 512, or the "
                                "SFT max_length when shorter).", min=1)] = None,
    reserve: Annotated[str, typer.Option(
        "--reserve", help="Memory per GPU kept for the CUDA context, NCCL and fragmentation.")] = "2GiB",
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Per-GPU memory of every stage (weights, gradients, optimizer, activations, KV cache) and the sharding,
    micro-batch and QLoRA that make it fit. Exits 1, with the numbers, when a stage cannot fit."""
    from pydantic import ValidationError

    from .pipeline import PIPELINE_PRESETS, PipelineConfig, load_config_file, parse_override, resolve
    from .plan import parse_memory, plan_pipeline

    if preset not in PIPELINE_PRESETS:
        fail(f"unknown preset {preset!r}; available presets: {', '.join(PIPELINE_PRESETS)}", EXIT_USAGE)
    try:
        fields = load_config_file(config) if config is not None else {}
        fields["preset"] = preset
        if rejection_sampling is not None:
            fields["rejection_sampling"] = rejection_sampling
        overrides = dict(fields.get("overrides") or {})
        overrides.update(parse_override(item) for item in (set_ or []))
        fields["overrides"] = overrides
        resolved = resolve(PipelineConfig.model_validate(fields))
        memory, reserved = parse_memory(gpu_memory), parse_memory(reserve) if reserve.strip() != "0" else 0
        if memory is not None and reserved >= memory:
            raise ValueError(f"--reserve {reserve} leaves nothing of --gpu-memory {gpu_memory}")
    except FileNotFoundError as err:
        fail(str(err), EXIT_USAGE)
    except (ValidationError, ValueError) as err:
        fail(f"invalid plan request: {err}", EXIT_USAGE)
    result = plan_pipeline(resolved, gpus=gpus, gpu_memory=memory, nodes=nodes, reserve=reserved,
                           prompt_tokens=prompt_tokens)
    typer.echo(json.dumps(result.as_dict(), indent=2) if as_json else result.table())
    if not result.fits:
        bad = ", ".join(f"{s.stage} ({s.total / 2**30:,.1f} GiB > {s.budget / 2**30:,.1f} GiB)"
                        for s in result.refused())
        fail(f"the run cannot fit: {bad}", EXIT_REFUSED)


@app.command("launch", rich_help_panel=PIPELINE_PANEL, epilog=EXIT_CODES_HELP)
def launch(
    spec: Annotated[Path, typer.Argument(help="JSON file: {stage, config, inputs, out_dir} (the stage's own config "
                                              "and inputs fields; unset config fields take their defaults).")],
    nproc_per_node: Annotated[Optional[int], typer.Option(
        "--nproc-per-node", help="Processes (GPUs) on this node (default: the config's num_processes).", min=1)
    ] = None,
    num_nodes: Annotated[Optional[int], typer.Option("--num-nodes", help="Nodes in the job.", min=1)] = None,
    node_rank: Annotated[Optional[int], typer.Option("--node-rank", help="This node's rank (0-based).", min=0)] = None,
    rdzv_endpoint: Annotated[Optional[str], typer.Option(
        "--rdzv-endpoint", help="HOST:PORT of the rendezvous, the same on every node (e.g. node 0:29400).")] = None,
    rdzv_id: Annotated[Optional[str], typer.Option(
        "--rdzv-id", help="Job id, the same on every node (e.g. $SLURM_JOB_ID).")] = None,
    rdzv_backend: Annotated[Optional[str], typer.Option(
        "--rdzv-backend", help="c10d (torchrun assigns the ranks) or static (--node-rank does).")] = None,
) -> None:
    """Run one stage on this node under torchrun: one call per node of a multi-node job (Slurm srun, a Kubernetes
    PyTorchJob, one Prefect flow run per node). Options override the config's `launch` settings."""
    from pydantic import ValidationError

    from .launch import LaunchError, LaunchSettings, _lookup, launch_settings, launch_stage

    if not spec.is_file():
        fail(f"{spec}: no such spec file", EXIT_USAGE)
    try:
        try:
            data = json.loads(spec.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{spec}:{err.lineno}:{err.colno}: not valid JSON: {err.msg}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{spec}: expected a JSON object {{stage, config, inputs, out_dir}}, got "
                             f"{type(data).__name__}")
        for key in ("stage", "inputs", "out_dir"):
            if key not in data:
                raise ValueError(f"{spec}: missing {key!r}: expected {{stage, config, inputs, out_dir}}")
        config_cls, inputs_cls, _ = _lookup(data["stage"])
        config = config_cls.model_validate(data.get("config") or {})
        inputs = inputs_cls.model_validate(data["inputs"])
        given = dict(num_nodes=num_nodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id,
                     rdzv_backend=rdzv_backend)
        settings = LaunchSettings.model_validate({**launch_settings(config).model_dump(),
                                                  **{k: v for k, v in given.items() if v is not None}})
    except (ValidationError, ValueError) as err:
        fail(f"invalid launch spec: {err}", EXIT_USAGE)
    nproc = nproc_per_node or int(getattr(config, "num_processes", 1) or 1)
    try:
        result = launch_stage(data["stage"], config, inputs, data["out_dir"], nproc, log=typer.echo,
                              backend=data.get("backend"), launch=settings)
    except LaunchError as err:
        fail(str(err), EXIT_REFUSED)
    typer.echo(f"{result.stage}: done ({result.steps} steps, world size {result.provenance.get('world_size')}); "
               f"output {result.final or result.out_dir}")


@app.command("eval", rich_help_panel=PIPELINE_PANEL, epilog=EXIT_CODES_HELP)
def evaluate(
    checkpoint: Annotated[list[str], typer.Option(
        "--checkpoint", help="Policy checkpoint to evaluate (repeatable; NAME=PATH or PATH).")],
    baseline: Annotated[str, typer.Option("--baseline", help="Baseline checkpoint (NAME=PATH or PATH).")],
    prompts: Annotated[Path, typer.Option("--prompts", help="Evaluation prompts (kind eval).")],
    reward_helpfulness: Annotated[Path, typer.Option("--reward-helpfulness", help="Helpfulness RM directory.")],
    reward_safety: Annotated[Path, typer.Option("--reward-safety", help="Safety RM directory.")],
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Evaluation stage directory [default: $LLAMA2_ALIGN_RUNS_ROOT/eval, else runs/eval].",
        show_default=False)] = None,
    preset: Annotated[str, typer.Option("--preset", help="Take the evaluation settings of this pipeline preset "
                                                         "(demo-tiny, llama2-7b, ...).")] = "demo-tiny",
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override an eval field, e.g. --set "
                                                                     "temperature=0.7")] = None,
) -> None:
    """Evaluate checkpoints against a baseline: safety (violations, false refusals) and helpfulness (RM win rate)."""
    from pydantic import ValidationError

    from .errors import ConfigError
    from .pipeline import PIPELINE_PRESETS, PipelineConfig, parse_override, resolve
    from .stages.evaluate import EvalInputs, run_eval

    if out is None:
        out = Path(os.environ.get("LLAMA2_ALIGN_RUNS_ROOT") or "runs") / "eval"

    def named(spec: str) -> tuple[str, str]:
        name, sep, path = spec.partition("=")
        if sep and not (name and path):
            fail(f"{spec!r}: expected NAME=PATH (both given) or PATH", EXIT_USAGE)
        return (name, path) if sep else (Path(spec).parent.name if Path(spec).name == "final" else Path(spec).name,
                                         spec)

    base_name, base_path = named(baseline)
    ckpts = {base_name: base_path}
    for spec in checkpoint:
        name, path = named(spec)
        if name in ckpts:
            name = f"{name}-{len(ckpts)}"
        ckpts[name] = path
    for name, path in ckpts.items():
        require_checkpoint_dir(path, name)
    if preset not in PIPELINE_PRESETS:
        fail(f"unknown preset {preset!r}; available presets: {', '.join(PIPELINE_PRESETS)}", EXIT_USAGE)
    try:  # the preset's eval section with --set over it, checked as `run --set eval.<field>=...` is
        fields = dict(parse_override(s) for s in (set_ or []))
        cfg = resolve(PipelineConfig(preset=preset, overrides={f"eval.{k}": v for k, v in fields.items()})).eval
    except ConfigError as err:
        fail(str(err).replace("override 'eval.", "--set '"), EXIT_USAGE)
    except ValidationError as err:
        fail("--set: " + "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in err.errors()),
             EXIT_USAGE)
    try:
        result = run_eval(cfg, EvalInputs(checkpoints=ckpts, baseline=base_name, prompts=str(prompts),
                                          reward_helpfulness=str(reward_helpfulness),
                                          reward_safety=str(reward_safety)), out)
    except (FileExistsError, NotADirectoryError) as err:
        fail(f"--out {out}: cannot be the evaluation's directory ({err.strerror}: {err.filename})")
    except (ValidationError, ValueError, FileNotFoundError) as err:
        fail(str(err))
    from .report import EVAL_KEYS

    names = list(result.metrics["checkpoints"])
    typer.echo("metric".ljust(24) + "".join(n.rjust(14) for n in names))
    for key in EVAL_KEYS:
        vals = [result.metrics["checkpoints"][n].get(key) for n in names]
        typer.echo(key.ljust(24) + "".join(("n/a" if v is None else f"{v:.3f}").rjust(14) for v in vals))
    typer.echo(f"results: {Path(out) / 'result.json'}")


@app.command("chat", rich_help_panel=PIPELINE_PANEL, epilog=EXIT_CODES_HELP)
def chat(
    checkpoint: Annotated[Path, typer.Argument(help="Policy checkpoint directory.", show_default=False)],
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Chat with a checkpoint in the Llama 2 chat format, streaming tokens. Reads prompts from stdin (one per line)
    when stdin is not a terminal; type /reset to start over and /exit (or Ctrl-D) to leave."""
    import sys

    require_checkpoint_dir(checkpoint)
    from pydantic import ValidationError

    from .generation import GenerationSettings, stream_text
    from .model import build_model, freeze
    from .tokenizer import load_tokenizer

    try:  # the options first: a bad one is refused before the model loads
        settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    except ValidationError as err:
        fail("; ".join(f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']}" for e in err.errors()), EXIT_USAGE)
    try:
        model = freeze(build_model(checkpoint, "policy"))
        tok = load_tokenizer(checkpoint)
    except (ValueError, OSError) as err:
        fail(f"cannot load {checkpoint}: {err}")
    interactive = sys.stdin.isatty()
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    base_history = list(history)
    n = 0
    while True:
        n += 1
        if interactive:
            try:
                line = input("you> ")
            except EOFError:
                break
        else:
            line = sys.stdin.readline()
            if not line:
                break
        try:  # undecodable bytes arrive as surrogates, which the tokenizer cannot encode
            line.encode("utf-8")
        except UnicodeEncodeError:
            if not interactive:
                fail(f"standard input, line {n}: not UTF-8 text")
            typer.echo("(not UTF-8 text: type it again)", err=True)
            continue
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/reset":
            history = list(base_history)
            continue
        history.append({"role": "user", "content": line})
        typer.echo("assistant> ", nl=False)
        pieces = []
        for piece in stream_text(model, tok, history, settings):
            pieces.append(piece)
            typer.echo(piece, nl=False)
            sys.stdout.flush()
        typer.echo("")
        history.append({"role": "assistant", "content": "".join(pieces).strip() or "..."})


def main() -> None:
    app()


if __name__ == "__main__":
    main()
