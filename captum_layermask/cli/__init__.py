"""The ``layermask`` command (also ``python -m captum_layermask``).

``layermask explain`` explains an image's prediction with Lime, KernelShap, FeatureAblation or Occlusion under
black, grey and layer masking side by side, and writes a figure in the style of the paper's Figure 8 (top
segments for the class in green, against it in red) with the raw attributions. ``layermask evaluate`` measures
missingness bias (removal curves, shape bias, LIME metrics, diagnostics). With no arguments both use the bundled
demo model, offline. ``layermask view`` starts the browser view, ``layermask report`` writes a run as one HTML page.
"""

from __future__ import annotations

import argparse
import errno
import sys
from typing import Optional, Sequence

from ..core.errors import LayerMaskError
from ..datasets.ray_engine import ClusterUnreachableError
from . import evaluate, explain, view
from .io import CommandError


def build_parser() -> argparse.ArgumentParser:
    """The ``layermask`` parser: each subcommand adds its own (``explain.add_command``, ``evaluate.add_command``)."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="layermask", description="Perturbation-based explanations of CNNs with layer masking."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    explain.add_command(commands)
    evaluate.add_command(commands)
    view.add_commands(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the command; user mistakes print one ``layermask: error:`` line and return 2."""
    args = build_parser().parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")  # figures go to files only
    try:
        args.run(args)
    except (CommandError, LayerMaskError, ClusterUnreachableError) as error:
        print(f"layermask: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {error.filename}" if error.filename else ""
        print(
            f"layermask: error: no space left on the device{where}; free some space (results written so far are "
            "kept, and the same command resumes a dataset run) or give --out on another disk.",
            file=sys.stderr,
        )
        return 1
    return 0
