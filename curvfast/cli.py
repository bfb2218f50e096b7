"""The ``curvfast`` command line: collect | eigen | edit | eval | demo | sweep | report | info."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Optional

EXAMPLES = {
    "collect": """\
        example:
          curvfast collect ./my-model --data train.jsonl --modules mlp_in --layers 23,24,25 \\
              --tokens 2000000 --seq-len 512 --out factors.safetensors
        Data: .txt files (one document each), .jsonl with a "text" or "input_ids" field, or a
        directory of them. Targets are sampled from the model (--fisher true, the default), so no
        labels are needed. The job saves its state to OUT.ckpt every --checkpoint-every tokens;
        if it is killed, run the same command again to resume.
        Many GPUs: torchrun --nproc-per-node 8 -m curvfast collect ./my-model --data ... --out factors/
        (each rank reads its share of the batches; one reduction per factor at the end).""",
    "eigen": """\
        example:
          curvfast eigen factors.safetensors --out eigen.safetensors
        A factor shared by several modules (gate_proj and up_proj read the same input) is
        decomposed once. Use --dtype float64 for very ill-conditioned factors.""",
    "edit": """\
        example:
          curvfast edit ./my-model --eigen eigen.safetensors --rho 0.6 --out ./my-model-edited
        Writes a complete model directory (save_pretrained, tokenizer and config copied) plus
        edit_report.json. --factors may be given instead of --eigen (decomposed on the fly).""",
    "eval": """\
        example:
          curvfast eval ./my-model-edited --memorized memorized.jsonl --heldout heldout.txt --json out.json
        memorized.jsonl: one record per line with "text", "input_ids", or "prefix"/"suffix".
        Recitation: greedy-decode the suffix from the prefix (default 64 + 48 tokens); strict =
        exact, loose = 1 - d/L >= 0.75 (d: token Levenshtein distance, L: suffix length).""",
    "demo": """\
        example:
          curvfast demo                 # train (cached) a small LM with planted canaries, edit it
          curvfast demo --rho 0.7 --json demo.json
        Offline, no downloads. The first run trains the model (a few minutes on 2 CPU cores);
        later runs reuse the cache.""",
    "sweep": """\
        example:
          curvfast sweep ./my-model --data train.jsonl --tokens 2000000 --memorized heldout_memorized.jsonl \\
              --heldout heldout.txt --layer-sets "23,24,25;20-25;-4:" --rho 0.6 0.7 0.8 0.9 --out sweep/
        One factor collection (or --factors / --eigen from earlier runs) and one
        eigendecomposition serve every point; only the edit is redone, and the model is
        restored between points. Writes sweep.json, sweep.md and sweep.png (matplotlib) to
        --out and names the best setting: lowest strict recitation with perplexity increase
        <= --max-ppl-increase; ties -> lower loose recitation, then lower perplexity.""",
    "report": """\
        example:
          curvfast demo --compare --vision --json demo.json && curvfast report demo.json --out report/
          curvfast report demo.json sweep/sweep.json --out report/
        Writes report/report.md with PNG plots (spectra, recitation vs rho, matched comparison,
        ViT arm, band shares, sweep) for whatever the results hold; plots need matplotlib
        (pip install 'curvfast[plot]'), tables are written without it.""",
    "info": """\
        example:
          curvfast info
        Prints versions, the build (CUDA, archs) and which compute backends are usable here.""",
}


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise CliError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda requested but no CUDA device is visible")
    return dev


def _dtype(name: str, device):
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in table:
        raise CliError(f"unknown dtype {name!r} (use auto, float32, bfloat16, float16)")
    return table[name]


def _model_dir(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise CliError(f"model directory not found: {p}")
    if not (p / "config.json").is_file():
        raise CliError(f"{p} is not a Hugging Face model directory (no config.json)")
    return p


def load_model(path: str, device, dtype, trust_remote_code: bool = False, task: str = "causal-lm"):
    """Load a local model from safetensors only (never unpickles .bin files)."""
    import transformers

    p = _model_dir(path)
    if not any(p.glob("*.safetensors")):
        raise CliError(f"{p} has no .safetensors weights; curvfast never unpickles .bin checkpoints "
                       "(convert them with transformers' save_pretrained(safe_serialization=True))")
    cls = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModelForImageClassification
    model = cls.from_pretrained(str(p), dtype=dtype, local_files_only=True, use_safetensors=True,
                                trust_remote_code=trust_remote_code)
    return model.to(device).eval()


def load_tokenizer(path: str, required: bool, trust_remote_code: bool = False):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                          trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        if required:
            raise CliError(f"cannot load a tokenizer from {path} ({type(e).__name__}); text data needs one "
                           "(or give jsonl with input_ids)") from None
        return None


def _needs_tokenizer(paths: list[str]) -> bool:
    from curvfast.data import read_documents

    try:
        first = next(iter(read_documents(paths)))
    except StopIteration:
        return False
    return isinstance(first, str)


def _check_out_file(path: str, overwrite: bool) -> Path:
    p = Path(path).expanduser()
    if p.exists() and not overwrite:
        raise CliError(f"{p} exists; pass --overwrite to replace it")
    if p.exists() and p.is_dir():
        raise CliError(f"{p} is a directory; give a file name")
    return p


def _parse_rho(value: str) -> float:
    try:
        rho = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"rho must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= rho <= 1.0:
        raise argparse.ArgumentTypeError(f"rho must be in [0, 1], got {rho}")
    return rho


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


# --------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------
def cmd_collect(args) -> int:
    import torch

    import curvfast
    from curvfast.data import text_batches

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        return _collect_distributed(args, world)
    out = _check_out_file(args.out, args.overwrite)
    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    model = load_model(args.model, device, dtype, args.trust_remote_code)
    tok = load_tokenizer(args.model, _needs_tokenizer(args.data), args.trust_remote_code)
    modules = args.modules.split(",") if "," in args.modules else args.modules
    names = curvfast.resolve_modules(model, modules, args.layers)  # fail fast on a bad pattern
    # Each row of seq_len data tokens yields seq_len - 1 counted positions.
    data_cap = None if args.tokens is None else \
        -(-args.tokens // max(args.seq_len - 1, 1)) * args.seq_len + args.seq_len * args.batch_size
    batches = text_batches(args.data, tok, seq_len=args.seq_len, batch_size=args.batch_size, max_tokens=data_cap)
    print(f"curvfast collect: {len(names)} modules of {type(model).__name__} on {device} ({dtype}), "
          f"{batches.tokens} data tokens, fisher={args.fisher}", file=sys.stderr)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    from curvfast.plan import activation_estimate, collect_planned, parse_bytes, plan_collection

    budget = parse_bytes(args.memory_budget) if args.memory_budget else None
    if budget is None and device.type == "cuda":
        budget = int(0.9 * torch.cuda.mem_get_info(device)[0]) + sum(
            p.numel() * p.element_size() for p in model.parameters())
    plan = plan_collection(model, names, budget, activation_estimate(model, args.batch_size, args.seq_len),
                           host_accumulators=args.host_accumulators)
    print(plan.describe(tokens=args.tokens), file=sys.stderr)
    ckpt = Path(args.checkpoint) if args.checkpoint else out.with_name(out.name + ".ckpt")
    if any(Path(f"{ckpt}.pass{i + 1}").exists() for i in range(len(plan.passes))):
        print(f"resuming from checkpoint {ckpt}.pass*", file=sys.stderr)
    fs = collect_planned(model, batches, plan, fisher=args.fisher, seed=args.seed, progress=not args.quiet,
                         max_tokens=args.tokens, backend=args.backend, checkpoint=ckpt,
                         checkpoint_every=args.checkpoint_every)
    fs.meta["model_name"] = str(_model_dir(args.model).resolve())
    curvfast.save_factors(fs, out)
    print(f"wrote {out}: {len(fs)} modules, {fs.tokens} tokens", file=sys.stderr)
    return 0


def _collect_distributed(args, world: int) -> int:
    """Under torchrun: every rank takes its share of the batches; --out is a directory that
    receives one factors part per rank and factors.index.json (readable by eigen and edit)."""
    import torch
    import torch.distributed as dist

    import curvfast
    from curvfast.data import text_batches
    from curvfast.distributed import collect_factors_distributed, save_distributed

    out = Path(args.out).expanduser()
    if (out / "factors.index.json").exists() and not args.overwrite:
        raise CliError(f"{out} already holds factors; pass --overwrite to replace them")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and args.device in ("auto", "cuda"):
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend)
    try:
        rank = dist.get_rank()
        model = load_model(args.model, device, _dtype(args.dtype, device), args.trust_remote_code)
        tok = load_tokenizer(args.model, _needs_tokenizer(args.data), args.trust_remote_code)
        modules = args.modules.split(",") if "," in args.modules else args.modules
        names = curvfast.resolve_modules(model, modules, args.layers)
        batches = text_batches(args.data, tok, seq_len=args.seq_len, batch_size=args.batch_size)
        ckpt = out / f"factors-rank{rank:05d}.ckpt"
        out.mkdir(parents=True, exist_ok=True)
        fs = collect_factors_distributed(model, batches, modules=names, fisher=args.fisher, seed=args.seed,
                                         progress=not args.quiet, backend=args.backend,
                                         max_tokens=-(-args.tokens // world) if args.tokens else None,
                                         checkpoint=ckpt, checkpoint_every=args.checkpoint_every)
        index = save_distributed(fs, out, "factors")
        if rank == 0:
            print(f"wrote {index}: {len(fs.meta['owners'])} modules over {world} ranks, {fs.tokens} tokens",
                  file=sys.stderr)
    finally:
        dist.destroy_process_group()
    return 0


def cmd_eigen(args) -> int:
    import torch

    import curvfast

    out = _check_out_file(args.out, args.overwrite)
    fs = curvfast.load_factors(args.factors)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    es = curvfast.eigendecompose(fs, dtype=dtype, device=_device(args.device), progress=not args.quiet)
    curvfast.save_eigen(es, out)
    clamped = sum(e.A.clamped + e.G.clamped for e in es.values())
    print(f"wrote {out}: {len(es)} modules ({clamped} negative rounding-level eigenvalues clamped to 0)",
          file=sys.stderr)
    return 0


def _meta_model(src: Path, trust_remote_code: bool):
    """The model's module tree on the meta device: names and shapes, no weights, no memory."""
    import torch
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(str(src), local_files_only=True, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)


def cmd_edit(args) -> int:
    import curvfast
    from curvfast.edit import format_reports
    from curvfast.shards import LazyEigen, _replace_dir, checkpoint_targets, edit_checkpoint
    from curvfast.store import _is_index, check_model

    if (args.eigen is None) == (args.factors is None):
        raise CliError("give exactly one of --eigen or --factors")
    out = Path(args.out).expanduser()
    src = _model_dir(args.model)
    if out.exists() and not args.overwrite:
        raise CliError(f"{out} exists; pass --overwrite to replace it")
    if out.resolve() == src.resolve():
        raise CliError("--out must differ from the input model directory")
    device = _device(args.device)
    skeleton = _meta_model(src, args.trust_remote_code)
    if args.eigen is not None and _is_index(args.eigen):
        eigen = curvfast.load_eigen(args.eigen, model=skeleton)  # parts of a distributed job
    elif args.eigen is not None:
        eigen = LazyEigen(args.eigen)
    else:
        fs = curvfast.load_factors(args.factors)
        check_model(fs.meta, {n: {"d_out": f.d_out, "d_in": f.d_in} for n, f in fs.items()}, skeleton, args.factors)
        eigen = curvfast.eigendecompose(fs, device=device, progress=not args.quiet)
    if isinstance(eigen, LazyEigen):
        check_model(eigen.meta, eigen.modules, skeleton, args.eigen)
    names = list(eigen)
    if args.modules:
        spec = args.modules.split(",") if "," in args.modules else args.modules
        chosen = set(curvfast.resolve_modules(skeleton, spec, args.layers))
        names = [n for n in names if n in chosen]
        if not names:
            raise CliError(f"none of the selected modules has an eigenbasis in {args.eigen or args.factors}")
    try:
        checkpoint_targets(src, eigen, names)
        streamed = True
    except KeyError:
        streamed = False  # weights stored under other names: edit a loaded model instead
    if streamed:
        report = edit_checkpoint(src, eigen, out, rho=args.rho, modules=names, overwrite=args.overwrite,
                                 progress=not args.quiet, device=device)
        reports = report["modules"]
    else:
        model = load_model(args.model, device, _dtype(args.dtype, device), args.trust_remote_code)
        result = curvfast.edit_model(model, eigen, rho=args.rho, modules=names)
        reports = result.reports
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            model.save_pretrained(str(tmp), safe_serialization=True)
            for f in src.iterdir():  # tokenizer and other side files, never weights
                if f.is_file() and not (tmp / f.name).exists() and not f.name.endswith((".safetensors", ".bin", ".pt")):
                    shutil.copy2(f, tmp / f.name)
            report = {"source": str(src.resolve()), "rho": args.rho, "meta": eigen.meta, "modules": reports,
                      "mode": "loaded model, save_pretrained"}
            (tmp / "edit_report.json").write_text(json.dumps(report, indent=2, default=str))
            _replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if not args.quiet:
        print(format_reports(reports))
    print(f"wrote {out} ({len(names)} modules edited at rho={args.rho}, "
          f"{'streamed shard by shard' if streamed else 'via the loaded model'})", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from curvfast.data import load_memorized, text_batches
    from curvfast.evaluate import perplexity, recitation

    if not args.memorized and not args.heldout:
        raise CliError("nothing to evaluate: give --memorized and/or --heldout")
    device = _device(args.device)
    model = load_model(args.model, device, _dtype(args.dtype, device), args.trust_remote_code)
    need_tok = bool(args.heldout and _needs_tokenizer(args.heldout))
    tok = load_tokenizer(args.model, need_tok, args.trust_remote_code)
    results: dict[str, Any] = {"model": str(_model_dir(args.model).resolve())}
    if args.memorized:
        seqs = load_memorized(args.memorized, tok, max_sequences=args.max_sequences)
        prefix_len = None if args.prefix_len == 0 else args.prefix_len
        rec = recitation(model, seqs, prefix_len=prefix_len, suffix_len=args.suffix_len,
                         batch_size=args.batch_size, progress=not args.quiet)
        results["recitation"] = rec
        print(f"recitation ({rec['n']} sequences): strict {rec['strict']:.2%}  loose {rec['loose']:.2%}  "
              f"mean d/L {rec['mean_dist']:.3f}")
    if args.heldout:
        batches = text_batches(args.heldout, tok, seq_len=args.seq_len, batch_size=args.batch_size,
                               max_tokens=args.max_tokens, drop_last=False)
        ppl = perplexity(model, batches, progress=not args.quiet)
        results["perplexity"] = ppl
        print(f"held-out perplexity ({ppl['tokens']} tokens): {ppl['perplexity']:.3f} "
              f"(mean over batches of exp(batch loss), the paper's variant: {ppl['perplexity_mean_batch_exp']:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


def cmd_demo(args) -> int:
    from curvfast.demo import run_demo

    run_demo(args)
    return 0


def cmd_sweep(args) -> int:
    import curvfast
    from curvfast.data import load_memorized, text_batches
    from curvfast.sweep import format_sweep, layer_subsets, sweep, write_sweep

    given = [x for x in (args.data, args.factors, args.eigen) if x]
    if len(given) != 1:
        raise CliError("give exactly one of --data (collect factors now), --factors or --eigen")
    specs = [x.strip() for x in args.layer_sets.split(";") if x.strip()]
    if not specs:
        raise CliError("--layer-sets is empty; give e.g. '23,24,25;20-25'")
    out = Path(args.out).expanduser()
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise CliError(f"{out} exists and is not empty; pass --overwrite to write into it")
    device = _device(args.device)
    model = load_model(args.model, device, _dtype(args.dtype, device), args.trust_remote_code)
    need_tok = _needs_tokenizer(args.heldout) or (bool(args.data) and _needs_tokenizer(args.data))
    tok = load_tokenizer(args.model, need_tok, args.trust_remote_code)
    modules = args.modules.split(",") if "," in args.modules else args.modules
    union: list[str] = []
    for spec in specs:  # fail fast on a bad layer spec, before any collection
        for n in curvfast.resolve_modules(model, modules, None if spec == "all" else spec):
            if n not in union:
                union.append(n)
    if args.data:
        cap = None if args.tokens is None else \
            -(-args.tokens // max(args.seq_len - 1, 1)) * args.seq_len + args.seq_len * args.batch_size
        batches = text_batches(args.data, tok, seq_len=args.seq_len, batch_size=args.batch_size, max_tokens=cap)
        factors = curvfast.collect_factors(model, batches, modules=union, fisher=args.fisher, seed=args.seed,
                                           progress=not args.quiet, max_tokens=args.tokens)
        eigen = curvfast.eigendecompose(factors, progress=not args.quiet)
    elif args.factors:
        eigen = curvfast.eigendecompose(curvfast.load_factors(args.factors), progress=not args.quiet)
    else:
        eigen = curvfast.load_eigen(args.eigen)
    subsets = layer_subsets(model, eigen, specs, modules)
    memorized = load_memorized(args.memorized, tok, max_sequences=args.max_sequences)
    held = text_batches(args.heldout, tok, seq_len=args.seq_len, batch_size=args.batch_size,
                        max_tokens=args.max_tokens, drop_last=False)
    prefix_len = None if args.prefix_len == 0 else args.prefix_len
    result = sweep(model, eigen, subsets, args.rho, memorized, held, prefix_len=prefix_len,
                   suffix_len=args.suffix_len, max_ppl_increase=args.max_ppl_increase,
                   batch_size=args.batch_size, progress=not args.quiet)
    written = write_sweep(result, out)
    print(format_sweep(result))
    print(f"wrote {', '.join(v for k, v in written.items() if k != 'note')}"
          + (f" ({written['note']})" if "note" in written else ""), file=sys.stderr)
    return 0


def cmd_report(args) -> int:
    from curvfast.report import build_report, load_results

    out = Path(args.out).expanduser()
    if (out / "report.md").exists() and not args.overwrite:
        raise CliError(f"{out / 'report.md'} exists; pass --overwrite to replace it")
    written = build_report(load_results(args.results), out)
    print(f"wrote {written['markdown']} and {len(written['plots'])} plots"
          + (f" ({written['note']})" if "note" in written else ""), file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    import platform

    import torch

    import curvfast
    from curvfast.ops import backend_status

    info = curvfast.build_info()
    print(f"curvfast {curvfast.__version__}  (python {platform.python_version()}, {platform.machine()})")
    print(f"torch    {torch.__version__}  (CUDA {torch.version.cuda or 'none'}; "
          f"device visible: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'})")
    if info.get("built"):
        print(f"build    extension built against torch {info['torch_version']}; CUDA sources: "
              f"{'yes, archs ' + str(info['cuda_archs']) if info['with_cuda'] else 'no (' + info['cuda_reason'] + ')'}")
        if info["torch_version"] != torch.__version__:
            print(f"warning  the extension was built against torch {info['torch_version']} but torch "
                  f"{torch.__version__} is running: reinstall with `pip install -e . --no-build-isolation`")
    else:
        print("build    no build information (the extension was not built)")
    print("backends:")
    for name, (ok, why) in backend_status().items():
        print(f"  {name:<7} {'available' if ok else 'unavailable':<12} {why}")
    return 0


# --------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------
def _measurement_args(p: argparse.ArgumentParser, seq_len_help: str) -> None:
    """Recitation and perplexity options shared by ``eval`` and ``sweep``."""
    p.add_argument("--prefix-len", type=int, default=64, help="prefix tokens (default 64; 0 = all but the suffix)")
    p.add_argument("--suffix-len", type=_positive_int, default=48, help="suffix tokens to recite (default 48)")
    p.add_argument("--max-sequences", type=_positive_int, default=None, help="memorized sequences to use at most")
    p.add_argument("--seq-len", type=_positive_int, default=512, help=seq_len_help)
    p.add_argument("--max-tokens", type=_positive_int, default=None, help="held-out tokens to read at most")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="batch size (default 8)")


def _common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if visible, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="model dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model repository's own Python code to run (off by default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="curvfast",
        description="Remove memorized data from transformers by editing MLP weights in the K-FAC eigenbasis "
                    "of the loss curvature.  Pipeline: collect -> eigen -> edit -> eval.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'curvfast COMMAND --help' for each command's options and an example.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, epilog=textwrap.dedent(EXAMPLES[name]),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
        return p

    p = add("collect", "Collect K-FAC factors (A, G) of MLP weights over local data.")
    p.add_argument("model", help="local Hugging Face model directory (safetensors weights)")
    p.add_argument("--data", nargs="+", required=True, help=".txt / .jsonl files or directories")
    p.add_argument("--out", required=True, help="output .safetensors file for the factors (under torchrun: a "
                   "directory receiving one part per rank and factors.index.json)")
    p.add_argument("--modules", default="mlp_in",
                   help="preset (mlp, mlp_in [default: gate/up as in the paper], mlp_out), or comma-separated "
                        "names / globs like 'model.layers.*.mlp.up_proj'")
    p.add_argument("--layers", default=None, help="layer selection: '23,24,25', '20-25', '-3:', 'upper' (default: all)")
    p.add_argument("--fisher", choices=("true", "empirical"), default="true",
                   help="true: targets sampled from the model (default); empirical: the data's next token")
    p.add_argument("--tokens", type=_positive_int, default=None, help="stop after this many counted tokens")
    p.add_argument("--seq-len", type=_positive_int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="sequences per batch (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled targets (default 0)")
    p.add_argument("--backend", default="auto", help="covariance backend: auto, torch, cpp, cuda, triton")
    p.add_argument("--memory-budget", default=None,
                   help="device memory to plan for, e.g. 70GB (default: free GPU memory; no planning on CPU); "
                        "factors that do not fit are collected in several passes over the data")
    p.add_argument("--host-accumulators", action="store_true",
                   help="keep fp32 accumulators in pinned host memory instead of making several passes")
    p.add_argument("--checkpoint", default=None,
                   help="resumable-state file (default: OUT.ckpt); rerun the same command after a crash to resume")
    p.add_argument("--checkpoint-every", type=_positive_int, default=1_000_000,
                   help="save the resumable state every this many tokens (default 1000000)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    _common_model_args(p)
    p.set_defaults(func=cmd_collect)

    p = add("eigen", "Eigendecompose saved factors into eigenbases.")
    p.add_argument("factors", help="factors .safetensors written by 'curvfast collect'")
    p.add_argument("--out", required=True, help="output .safetensors file for the eigenbases")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="solver dtype (default float32)")
    p.add_argument("--device", default="auto", help="where to solve: auto, cpu, cuda")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_eigen)

    p = add("edit", "Edit a model: keep the top-curvature components holding fraction rho of the mass.")
    p.add_argument("model", help="local Hugging Face model directory to edit (left untouched)")
    p.add_argument("--eigen", help="eigenbases from 'curvfast eigen'")
    p.add_argument("--factors", help="factors from 'curvfast collect' (decomposed on the fly)")
    p.add_argument("--rho", type=_parse_rho, default=0.6, help="curvature-mass fraction kept, in [0, 1] (default 0.6)")
    p.add_argument("--modules", default=None, help="edit only these modules (preset, names or globs); default: all in the file")
    p.add_argument("--layers", default=None, help="with --modules: layer selection")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    _common_model_args(p)
    p.set_defaults(func=cmd_edit)

    p = add("eval", "Measure recitation of memorized sequences and held-out perplexity.")
    p.add_argument("model", help="local Hugging Face model directory")
    p.add_argument("--memorized", help="jsonl of memorized sequences")
    p.add_argument("--heldout", nargs="+", help="held-out .txt / .jsonl files for perplexity")
    _measurement_args(p, seq_len_help="perplexity window (default 512)")
    p.add_argument("--json", help="write all numbers to this JSON file")
    _common_model_args(p)
    p.set_defaults(func=cmd_eval)

    p = add("demo", "Offline demo: a small LM memorizes planted canaries; the curvature edit removes them.")
    from curvfast.demo import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_demo)

    p = add("sweep", "Sweep layer subsets x rho on held-out memorized data and text; name the best setting.")
    p.add_argument("model", help="local Hugging Face model directory")
    p.add_argument("--memorized", required=True, help="jsonl of held-out memorized sequences (as for 'eval')")
    p.add_argument("--heldout", nargs="+", required=True, help="held-out .txt / .jsonl files for perplexity")
    p.add_argument("--data", nargs="+", default=None, help="data to collect factors on (or give --factors / --eigen)")
    p.add_argument("--factors", default=None, help="factors from 'curvfast collect' covering every layer set")
    p.add_argument("--eigen", default=None, help="eigenbases from 'curvfast eigen' covering every layer set")
    p.add_argument("--modules", default="mlp_in", help="modules edited in each layer set (default mlp_in: gate/up)")
    p.add_argument("--layer-sets", required=True,
                   help="';'-separated layer selections, e.g. '23,24,25;20-25;-4:;upper;all'")
    p.add_argument("--rho", type=_parse_rho, nargs="+", default=[0.6, 0.7, 0.8, 0.9],
                   help="curvature-mass fractions (default 0.6 0.7 0.8 0.9)")
    p.add_argument("--max-ppl-increase", type=float, default=0.10,
                   help="perplexity budget of the best-setting rule, relative (default 0.10 = +10%%)")
    p.add_argument("--fisher", choices=("true", "empirical"), default="true", help="with --data (default true)")
    p.add_argument("--tokens", type=_positive_int, default=None, help="with --data: counted tokens to collect")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled targets (default 0)")
    _measurement_args(p, seq_len_help="sequence length for data and perplexity (default 512)")
    p.add_argument("--out", required=True, help="output directory for sweep.json, sweep.md, sweep.png")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out directory")
    _common_model_args(p)
    p.set_defaults(func=cmd_sweep)

    p = add("report", "Turn demo / sweep results (JSON) into a markdown page with PNG plots.")
    p.add_argument("results", nargs="+", help="JSON files from 'curvfast demo --json' and/or 'curvfast sweep'")
    p.add_argument("--out", required=True, help="output directory for report.md and the plots")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report.md")
    p.set_defaults(func=cmd_report)

    p = add("info", "Show versions, the build and available compute backends.")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("CURVFAST_DEBUG") == "1"
    from curvfast.ops import BackendUnavailable
    from curvfast.store import StoreError

    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("curvfast: interrupted; nothing was written", file=sys.stderr)
        return 130
    except (CliError, StoreError, BackendUnavailable, FileNotFoundError, ValueError, KeyError, OSError) as e:
        if debug:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"curvfast {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
