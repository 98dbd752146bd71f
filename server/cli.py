"""``fedpagkd``: one command for everything a user runs (the ``[project.scripts]`` entry point).

    fedpagkd simulate [--experiment E] [key=value ...]     federated run on Ray (server.launch; --preset R)
    fedpagkd experiment [hydra overrides]                   Hydra jobs of simulate (server.experiment)
    fedpagkd centralised [hydra overrides]                  centralised reference (benchmarks.centralised)
    fedpagkd reference [...]                                the plain reference CNN (benchmarks.reference)
    fedpagkd recipe curve|report                            training-recipe figures (benchmarks.recipe)
    fedpagkd study [--regime R] [--seeds ...]               the federated PaGKD study (benchmarks.study)
    fedpagkd predict / export ...                           use a trained student (client.predict)
    fedpagkd check-site PATH --modality nbi                 a site's data check before joining
    fedpagkd write-synthetic OUT                            the synthetic federation as ImageFolder trees
    fedpagkd fetch-weights resnet50 --out resnet50.safetensors   timm weights to copy to an offline machine
    fedpagkd certs ...                                      TLS + SuperNode keys (deploy/certs/make_certs.py)

Each subcommand passes the rest of the line to that tool's own parser, so ``fedpagkd CMD
--help`` is the tool's help. Nothing heavy is imported before a command is chosen.
"""

from __future__ import annotations

import argparse
import importlib.util
import runpy
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CERTS_SCRIPT = REPO / "deploy" / "certs" / "make_certs.py"


@dataclass(frozen=True)
class Command:
    help: str
    run: Callable[[list[str]], int]


def _as_main(module: str, name: str) -> Callable[[list[str]], int]:
    """Run ``python -m module`` with these arguments (Hydra mains read ``sys.argv``)."""

    def run(argv: list[str]) -> int:
        if importlib.util.find_spec(module) is None:
            print(
                f"error: `fedpagkd {name}` needs the module {module}, which this installation does not have "
                "(run from a source checkout that has it)",
                file=sys.stderr,
            )
            return 2
        saved = sys.argv
        sys.argv = [f"fedpagkd {name}", *argv]
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exit_:  # argparse/Hydra exit codes
            return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        finally:
            sys.argv = saved
        return 0

    return run


def _simulate(argv: list[str]) -> int:
    from server.launch import main

    return main(argv)


def _predict(kind: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        from client.predict import main

        return main([kind, *argv])

    return run


def _check_site(argv: list[str]) -> int:
    from client.sitecheck import check_main

    return check_main(argv)


def _write_synthetic(argv: list[str]) -> int:
    from client.sitecheck import write_synthetic_main

    return write_synthetic_main(argv)


def _fetch_weights(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fedpagkd fetch-weights",
        description="On a machine with internet (or a warm timm/Hugging Face cache): write timm's pretrained weights of "
        "a backbone to a .safetensors file; copy it to an offline machine and set model.teacher_weights / "
        "model.student_weights to its path.",
    )
    parser.add_argument("backbone", help="a timm model name, e.g. resnet50 (what model.teacher / model.student say)")
    parser.add_argument("--out", type=Path, required=True, help="a new .safetensors file")
    args = parser.parse_args(argv)
    import common  # noqa: F401  (torchvision shim before timm)
    from common.models import PretrainedWeightsError, save_backbone_weights

    try:
        out = save_backbone_weights(args.backbone, args.out)
    except (PretrainedWeightsError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB); on the offline machine set "
        f"model.teacher_weights={out.name} and/or model.student_weights={out.name} (full paths there)"
    )
    return 0


def _certs(argv: list[str]) -> int:
    if not CERTS_SCRIPT.is_file():
        print(
            f"error: `fedpagkd certs` runs {CERTS_SCRIPT}, which this installation lacks; run it from a source checkout",
            file=sys.stderr,
        )
        return 2
    spec = importlib.util.spec_from_file_location("fedpagkd_make_certs", CERTS_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.main(argv)


COMMANDS: dict[str, Command] = {
    "simulate": Command(
        "federated run on a local Ray simulation (synthetic sites, or data.root=<folder with sites.toml>)", _simulate
    ),
    "experiment": Command(
        "Hydra jobs of simulate: presets, experiments, --multirun sweeps (conf/federated.yaml)",
        _as_main("server.experiment", "experiment"),
    ),
    "centralised": Command(
        "centralised reference on pooled data (Hydra, conf/centralised.yaml; preset=paper)",
        _as_main("benchmarks.centralised", "centralised"),
    ),
    "reference": Command(
        "the plain reference CNN on the same images, WLI and NBI (the yardstick a student must approach)",
        _as_main("benchmarks.reference", "reference"),
    ),
    "recipe": Command(
        "the training-recipe figures: learning curve + Bayes ceiling (curve), the report (report)",
        _as_main("benchmarks.recipe", "recipe"),
    ),
    "study": Command(
        "the powered federated PaGKD study: every arm, paired CIs over seeds (resumable)", _as_main("benchmarks.study", "study")
    ),
    "predict": Command("CSV of class probabilities for a folder of WLI images, from a trained student", _predict("predict")),
    "export": Command("a trained student as ONNX or TorchScript, verified against PyTorch", _predict("export")),
    "check-site": Command("check a site's data before joining (every image decoded; exit 1 on problems)", _check_site),
    "write-synthetic": Command("write the synthetic federation as ImageFolder trees + sites.toml (rehearsals)", _write_synthetic),
    "fetch-weights": Command("save timm's pretrained weights of a backbone to a file for offline machines", _fetch_weights),
    "certs": Command("CA, TLS certificates and SuperNode keys for a deployment (deploy/certs/make_certs.py)", _certs),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedpagkd",
        description="FedPaGKD: federated pairing-free group-level knowledge distillation (NBI -> WLI). "
        "`fedpagkd COMMAND --help` shows each command's options.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        # add_help=False: --help goes through to the tool's own parser.
        sub.add_parser(name, help=command.help, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv[:1])  # only the command; the rest is the tool's
    return int(COMMANDS[args.command].run(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
