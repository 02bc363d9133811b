"""The ``migrator`` command line, one binary in QEMU's spirit.

    migrator run --accel sim --memory 1G --workload ab --qmp unix:/tmp/src.sock
    migrator run --accel sim --memory 1G --qmp unix:/tmp/dst.sock --incoming tcp:127.0.0.1:4444 -S
    migrator demo [--memory 256M] [--workload ab] [--json] [--report DIR]
    migrator report HISTORY.json... --out DIR
    migrator compare [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..engine._machine import AccelConfig


#: sun_path of struct sockaddr_un holds 108 bytes including the NUL
UNIX_PATH_MAX = 107


def _qmp_address(text: str) -> tuple[str, str] | tuple[str, tuple[str, int]]:
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise argparse.ArgumentTypeError("unix: needs a path")
        if len(path.encode()) > UNIX_PATH_MAX:
            raise argparse.ArgumentTypeError(
                f"UNIX socket path '{path}' is too long (at most {UNIX_PATH_MAX} bytes)")
        return ("unix", path)
    if text.startswith("tcp:"):
        host, sep, port = text[4:].rpartition(":")
        if not sep or not port.isdigit():
            raise argparse.ArgumentTypeError(f"invalid tcp address {text!r} (tcp:HOST:PORT)")
        if not 1 <= int(port) <= 65535:
            raise argparse.ArgumentTypeError(f"port {port} in {text!r} is out of range (1..65535)")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return ("tcp", (host or "127.0.0.1", int(port)))
    raise argparse.ArgumentTypeError(f"invalid QMP address {text!r} (unix:PATH or tcp:HOST:PORT)")


def _argtype(parse: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """An argparse ``type=`` from one of the product's parsers: its ValueError
    becomes argparse's usage error with the parser's own message."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name
    return convert


def _parse_memory(text: str) -> int:
    """``--memory``/``-m``: QEMU's ``-m`` rules, so a bare number is MiB."""
    from ..engine._machine import parse_size

    return parse_size(text, default_suffix="M")


def _parse_accel(text: str) -> AccelConfig:
    from ..engine._machine import parse_accel

    return parse_accel(text)


def _parse_smp(text: str) -> int:
    from ..engine._machine import parse_smp

    return parse_smp(text)


def _parse_workload(text: str) -> tuple[str, dict[str, Any]]:
    from memory.kvm.sim.workloads import parse_workload

    return parse_workload(text)


_size = _argtype(_parse_memory, "size")
_accel = _argtype(_parse_accel, "accel")
_smp = _argtype(_parse_smp, "smp")
_workload = _argtype(_parse_workload, "workload")


def _serial(text: str) -> str:
    if not text.startswith("file:") or len(text) == 5:
        raise argparse.ArgumentTypeError("--serial takes file:PATH")
    return text[5:]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="migrator", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    run = sub.add_parser("run", help="run one VM process (source, or destination with --incoming)")
    run.add_argument("--accel", type=_accel, default="sim",
                     help="sim[,write-protect-all=on|off][,manual-protect=on|off][,pml=on|off][,dirty-log=bitmap|ring]"
                          "[,fault-cost=host|hw|0|US[:US]] | "
                          "kvm[,dirty-log=bitmap|clear|ring][,dirty-ring-size=N] | auto")
    run.add_argument("--memory", "-m", type=_size, default="256M", help="guest RAM size (e.g. 256M, 1G)")
    run.add_argument("--smp", type=_smp, default=1, metavar="N",
                     help="number of vCPUs (QEMU's -smp; sim: N vCPU processes on the shared MMU; "
                          "kvm: N vCPU threads; the ab guest splits its pages per vCPU)")
    run.add_argument("--workload", type=_workload, default="idle",
                     help="idle | ab | random | hotset [,rate=PAGES_PER_S][,seed=N]")
    run.add_argument("--qmp", type=_qmp_address, required=True, help="unix:PATH or tcp:HOST:PORT")
    run.add_argument("--incoming", metavar="URI", help="tcp:HOST:PORT | unix:PATH | file:PATH | defer")
    run.add_argument("-S", dest="start_paused", action="store_true",
                     help="do not start the vCPUs (until 'cont'); a destination stays paused after migration")
    run.add_argument("--serial", type=_serial, help="file:PATH for the guest's serial port (kvm guests)")
    run.add_argument("--label", default="", help="name used in logs and reports")

    demo = sub.add_parser("demo", help="migrate a guest between two processes and summarise")
    from ._demo import add_demo_arguments

    add_demo_arguments(demo, _size, _accel, _workload)

    rep = sub.add_parser("report", help="write a convergence report from recorded histories", add_help=False)
    rep.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "report":
        from ..reports._report import report_main

        return report_main(argv[1:])
    if argv and argv[0] == "compare":
        from ..reports._compare import compare_main

        try:
            return compare_main(argv[1:])
        except OSError as exc:  # e.g. an unwritable --out: a clear error, not a traceback
            where = f"{exc.filename}: " if exc.filename else ""
            print(f"migrator compare: error: {where}{exc.strerror or exc}", file=sys.stderr)
            return 1
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd == "run":
        return _run(args, parser)
    if args.cmd == "demo":
        from ._demo import demo_main

        return demo_main(args)
    parser.error(f"unknown command {args.cmd}")  # pragma: no cover
    return 2


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import trio

    from transport import parse_uri

    from ..engine._machine import parse_accel
    from ..qmp._vm import VM
    from ..errors import MigratorError

    accel = args.accel if not isinstance(args.accel, str) else parse_accel(args.accel)
    accel.smp = args.smp
    workload, wopts = args.workload if isinstance(args.workload, tuple) else (args.workload, {})
    if args.incoming and args.incoming != "defer":
        try:
            parse_uri(args.incoming)
        except ValueError as exc:
            parser.error(f"--incoming: {exc}")
    if accel.kind == "kvm":
        from memory.kvm import kvm_usable

        ok, why = kvm_usable()
        if not ok:
            print(f"migrator: --accel kvm: {why}", file=sys.stderr)
            return 1
    try:
        vm = VM(memory_bytes=args.memory, accel=accel, workload=workload, workload_opts=wopts,
                incoming=args.incoming, start_paused=args.start_paused,
                serial_path=args.serial, label=args.label, smp=args.smp)
    except (OSError, ValueError) as exc:
        print(f"migrator: {exc}", file=sys.stderr)
        return 1
    kind, addr = args.qmp

    async def main_async() -> None:
        if kind == "unix":
            await vm.run(qmp_path=addr)
        else:
            await vm.run(qmp_tcp=addr)

    try:
        trio.run(main_async)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:  # startup failures: one clear line, like QEMU
        leaves = _leaves(exc)
        known = (OSError, MigratorError)
        if not all(isinstance(e, known) for e in leaves):
            raise  # a bug: keep the traceback
        for e in leaves:
            print(f"migrator: {_describe(e)}", file=sys.stderr)
        return 1
    return 0


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    return str(exc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
