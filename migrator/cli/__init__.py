"""The command line (``migrator run|demo|report|compare``) and the demo
driver: the only place in the product where qemu.qmp and asyncio run (the
demo's QMP client, under ``asyncio.run`` in its own thread).

Top of the stack: may import every other subpackage; nothing imports it.
"""

from ._cli import build_parser, main

__all__ = ["build_parser", "main"]
