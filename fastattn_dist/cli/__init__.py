"""Command line: ``fastattn-dist demo | profile | bench | tune | generate | bench-model`` (also
``python -m fastattn_dist``), one module per subcommand, on top of the package (nothing below imports it).

Without a launcher the CLI spawns local ranks itself (gloo on CPU). Under torchrun or mpirun it
joins the launcher's process group instead (NCCL when GPUs are visible), and rank 0 prints. Every
value is checked before any rank starts: a bad one is a one-line error and exit code 2.
"""
from __future__ import annotations

import sys
from typing import List, Optional

from ..version import __version__
from ..parallel.process_group import RendezvousError
from ..parallel.spawn import RankFailedError
from ..runner import PreflightDone
from . import bench, bench_model, demo, generate, profile, tune
from .options import Parser


def build_parser() -> Parser:
    p = Parser(prog="fastattn-dist", description="Tensor-parallel attention with tiling-AllReduce: "
                                "demo, profile, bench and tune the TP block; generate with and bench the TP Llama-family model.")
    p.add_argument("--version", action="version", version=f"fastattn-dist {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for module in (demo, profile, bench, tune, generate, bench_model):
        module.add_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except PreflightDone:
        return 0
    except (ValueError, TypeError) as e:
        print(f"fastattn-dist: error: {e}", file=sys.stderr)
        return 2
    except (RankFailedError, RendezvousError) as e:
        print(f"fastattn-dist: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fastattn-dist: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
