"""The `finetune` command.

Why a dispatcher: the operator image has no torch and the trainer image has no kopf, yet both ship the same
`finetune` entry point. Each subcommand therefore lives in the package that owns it and is imported only when
it is asked for, so `finetune run` never loads kopf and `finetune operator` never loads torch.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

# subcommand -> ("module:function", one-line help). The function takes the remaining argv and returns an exit code.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("finetune_trainer.cli:run_main", "fine-tune a FineTuneJob manifest locally (no cluster)"),
    "train": ("finetune_trainer.cli:train_main", "trainer driver inside a Ray cluster (used by the head pod)"),
    "render": ("finetune_operator.commands:render_main", "print every child object of a FineTuneJob (dry run)"),
    "crd": ("finetune_operator.commands:crd_main", "print the generated CustomResourceDefinition"),
    "operator": ("finetune_operator.commands:operator_main", "run the operator (kopf)"),
}


def _usage() -> str:
    lines = ["usage: finetune <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def _resolve(target: str) -> Callable[[Sequence[str]], int]:
    module_name, func_name = target.split(":")
    func: Callable[[Sequence[str]], int] = getattr(importlib.import_module(module_name), func_name)
    return func


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"finetune: unknown command {name!r}; expected one of: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    return _resolve(SUBCOMMANDS[name][0])(rest)


if __name__ == "__main__":
    sys.exit(main())
