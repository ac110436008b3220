"""Upstream launch scripts (MindSpeed-MM examples/opensoraplan1.5/pretrain.sh, the fork's
examples/opensoraplan1.5/pretrain_opensoraplan1_5.sh) -> our launch flags.

`script_args` reads the arguments a script passes to its `pretrain_*.py` entry point, expanding the plain shell
variables and `$((...))` arithmetic these scripts use (nothing is executed). `translate_flags` maps them: a
flag our parser has carries over unchanged (same Megatron name, same meaning); the rest are listed in the tables
below with their counterpart or the reason they are left out.
"""

from __future__ import annotations

import ast
import operator
import re
import shlex

from megatron_video.migrate.report import Migration, MigrationError

GPT_PLACEHOLDER = "a Megatron GPT-model setting; SparseUMMDiT is built from --mm-model and does not read it"
DROPPED = {
    "--context-parallel-algo": "our context parallelism is skiparse-aware Ulysses, the only algorithm here",
    "--no-gradient-accumulation-fusion": "we never use the fused weight-gradient accumulation",
    "--normalization": GPT_PLACEHOLDER, "--use-fused-rmsnorm": GPT_PLACEHOLDER, "--qk-layernorm": GPT_PLACEHOLDER,
    "--num-layers": GPT_PLACEHOLDER, "--hidden-size": GPT_PLACEHOLDER, "--num-attention-heads": GPT_PLACEHOLDER,
    "--seq-length": GPT_PLACEHOLDER, "--max-position-embeddings": GPT_PLACEHOLDER,
    "--attention-dropout": GPT_PLACEHOLDER, "--hidden-dropout": GPT_PLACEHOLDER, "--tokenizer-type": GPT_PLACEHOLDER,
    "--vocab-size": GPT_PLACEHOLDER, "--position-embedding-type": GPT_PLACEHOLDER, "--rotary-base": GPT_PLACEHOLDER,
    "--swiglu": GPT_PLACEHOLDER, "--no-masked-softmax-fusion": GPT_PLACEHOLDER,
    "--fp32-residual-connection": GPT_PLACEHOLDER, "--attention-softmax-in-fp32": GPT_PLACEHOLDER,
    "--accumulate-allreduce-grads-in-fp32": "always on here (gradients are reduced in fp32)",
    "--no-load-rng": "no counterpart: the RNG state is restored with the checkpoint (exact resume)",
    "--no-save-optim": "no counterpart: checkpoints always hold the optimizer (exact resume)",
    "--no-save-rng": "no counterpart: checkpoints always hold the RNG state (exact resume)",
    "--eval-interval": "no evaluation loop here", "--eval-iters": "no evaluation loop here",
    "--ckpt-format": "ours saves dist checkpoints (load at any layout); import theirs with checkpoints_convert",
    "--distributed-backend": "chosen from --device (nccl on GPUs, hccl on Ascend; MindSpeed maps nccl to HCCL)",
    "--mm-tool": "MindSpeed-MM's tools config (profiling etc.); no counterpart",
    "--optimizer-selection": "ours: megatron-core AdamW plus separate sharded EMA weights (--ema-decay)",
    "--data-parallel-random-init": "only affects the initial weights before --load; ours starts DP replicas equal",
    "--model_custom_precision": "ours keeps norms, modulation and residual sums in fp32, as the fork's setting",
    "--wandb-project": "no W&B logger; use --tensorboard-dir", "--wandb-exp-name": "no W&B logger",
    "--wandb-save-dir": "no W&B logger", "--tensorboard-log-interval": "ours logs every --log-interval",
}
RENAMED = {"--clip_grad_ema_decay": "--clip-grad-ema-decay"}
_ARITH = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.floordiv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}


def _arith(expr: str) -> int:
    """Bash integer arithmetic on numbers: + - * / %."""
    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
            return _ARITH[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        raise MigrationError(f"cannot evaluate shell arithmetic $(({expr}))")
    try:
        return walk(ast.parse(expr.strip(), mode="eval").body)
    except SyntaxError as exc:
        raise MigrationError(f"cannot evaluate shell arithmetic $(({expr}))") from exc


def _expand(text: str, env: dict[str, str]) -> str:
    text = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m[1] or m[2], m[0]), text)
    return re.sub(r"\$\(\((.+?)\)\)", lambda m: str(_arith(m[1])), text)


def script_args(text: str) -> list[str]:
    """The arguments a launch script gives its `pretrain_*.py` entry point, variables expanded."""
    text = re.sub(r"\\\n", " ", text)
    env: dict[str, str] = {}
    command = None
    lines = iter(text.splitlines())
    for line in lines:
        match = re.match(r"^\s*(?:export\s+)?([A-Za-z_]\w*)=(.*)$", line)
        if match:
            value = match[2].strip()
            if value.startswith('"'):
                while value.count('"') % 2 and (more := next(lines, None)) is not None:
                    value += " " + more.strip()
                value = value.strip('"')
            elif value.startswith("'"):
                value = value.strip("'")
            try:
                env[match[1]] = _expand(value, env)
            except MigrationError:
                env[match[1]] = value  # e.g. $(date ...): never executed; only matters if passed on
        elif re.search(r"\bpretrain_\w*\.py\b", line) and not line.lstrip().startswith("#"):
            command = line
    if command is None:
        raise MigrationError("no `pretrain_*.py` command found in the launch script")
    words = shlex.split(_expand(command.split("pretrain_", 1)[1].split(".py", 1)[1], env), comments=True)
    args = []
    for word in words:
        if word in ("|", "||", "&&", ";") or word.startswith(("2>", ">", "|")):
            break
        args.append(word)
    return args


def _pairs(args: list[str]) -> list[tuple[str, str | None]]:
    pairs: list[tuple[str, str | None]] = []
    for word in args:
        if word.startswith("--"):
            pairs.append((word, None))
        elif pairs and pairs[-1][1] is None:
            pairs[-1] = (pairs[-1][0], word)
        else:
            raise MigrationError(f"launch argument {word!r} follows no flag")
    return pairs


def translate_flags(args: list[str], mig: Migration, flavour: str, data_yaml: str | None, model_yaml: str | None,
                    vae_json: str | None) -> None:
    """Map upstream launch arguments onto ours (appended to `mig.flags`); `data_yaml` / `model_yaml`: where the
    translated configs are written (None: not translated in this run)."""
    from megatron_video.arguments import build_parser

    ours = build_parser()._option_string_actions
    pairs = _pairs(args)
    given = dict(pairs)
    full_off = given.get("--recompute-granularity") == "full" and given.get("--recompute-num-layers") == "0"
    full_on = given.get("--recompute-granularity") == "full" and not full_off
    for flag, value in pairs:
        shown = flag if value is None else f"{flag} {value}"
        if flag in ("--recompute-granularity", "--recompute-method", "--recompute-num-layers") and full_off:
            mig.drop(shown, "--recompute-num-layers 0: no block is recomputed in full (full recompute is off)")
        elif flag == "--selective_recom":
            if full_on:
                mig.drop(shown, "full recompute is on, which covers the FFN half")
            else:
                mig.add_flag(shown, "--recompute-granularity", "selective")
        elif flag == "--recom_ffn_layers":
            mig.use(shown, "--recompute-granularity selective recomputes the FFN half of every block")
        elif flag == "--use-ema":
            mig.add_flag(shown, "--ema-decay", "0.9999")
        elif flag == "--num-workers" and data_yaml is None:
            mig.drop(shown, "the data YAML's num_workers: pass the data JSON as --mm-data to write it")
        elif flag == "--num-workers":
            mig.set_data(shown, "num_workers", int(value or 0))
        elif flag == "--mm-data" and data_yaml is None:
            mig.drop(shown, "not translated here: pass that file as --mm-data to get --data-config")
        elif flag == "--mm-data":
            mig.add_flag(shown, "--data-config", data_yaml)
        elif flag == "--mm-model" and model_yaml is None:
            mig.drop(shown, "not translated here: pass that file as --mm-model to get --model-config")
        elif flag == "--mm-model":
            mig.add_flag(shown, "--model-config", model_yaml)
            if vae_json:
                mig.flags += ["--vae-config", vae_json]
        elif flag == "--load":
            mig.drop(shown, f"an upstream checkpoint: `python -m checkpoints_convert import {value} OUT --from "
                            f"{flavour}`, then --load OUT (with --finetune or --no-load-optim)")
        elif flag == "--lr-warmup-init":
            _warmup_init(shown, float(value or 0), int(given.get("--lr-warmup-iters") or 0), mig)
        elif flag in RENAMED:
            mig.add_flag(shown, RENAMED[flag], *([value] if value is not None else []))
        elif flag in DROPPED:
            mig.drop(shown, DROPPED[flag])
        elif flag in ours:
            takes_value = ours[flag].nargs != 0
            if takes_value != (value is not None):
                raise MigrationError(f"{shown}: ours {'takes' if takes_value else 'takes no'} value")
            mig.add_flag(shown, flag, *([value] if value is not None else []))
        else:
            mig.drop(shown, "unknown to this translation; not carried over")
    if "--use-ema" not in given:
        mig.add_flag("(no --use-ema)", "--ema-decay", "0")
        mig.used[-1] = ("(no --use-ema)", "--ema-decay 0: upstream trained without EMA weights (ours keeps an "
                                          "EMA by default; drop this flag to keep one)")


def _warmup_init(shown: str, init: float, warmup_iters: int, mig: Migration) -> None:
    if warmup_iters == 0:
        mig.drop(shown, "no effect: --lr-warmup-iters is 0")
    elif init == 0.0:
        mig.drop(shown, "ours warms up from 0 as well")
    else:
        raise MigrationError(f"{shown}: ours warms up from 0 (no --lr-warmup-init)")


__all__ = ["DROPPED", "RENAMED", "script_args", "translate_flags"]
