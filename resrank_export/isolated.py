"""Run a memory-heavy step in a fresh Python process, so what it leaves allocated goes back to
the OS when that process exits. Measured on a Qwen3-0.6B-shape checkpoint: after
`torch.onnx.export` returns and the module is deleted and garbage-collected, its weights stay
resident (1.8 of the process's 1.8 GiB; malloc_trim frees 40 MB of it), so a build that exported
both graphs in one process began parity holding 3.8 GiB more than its base. A spawned child
(`multiprocessing`'s "spawn": no copy of the parent's memory) is the one reliable way to hand it
back. The parent stops the child when it is itself interrupted."""

from __future__ import annotations

import logging
import multiprocessing
from typing import Any, Callable

from resrank_export.errors import ResRankExportError

log = logging.getLogger(__name__)


def _child(connection, level: int, fn: Callable, args: tuple) -> None:
    logging.basicConfig(level=level, format="%(message)s")
    try:
        connection.send(("ok", fn(*args)))
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent
        try:
            connection.send(("error", exc))
        except Exception:  # an exception that does not pickle: its text
            connection.send(("error", ResRankExportError(f"{type(exc).__name__}: {exc}")))


def run_isolated(fn: Callable, *args: Any, what: str = "step") -> Any:
    """fn(*args) in a spawned process; its result, or its exception re-raised here. `fn` and
    `args` must pickle (module-level functions, dataclasses, paths)."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, logging.getLogger().getEffectiveLevel(), fn, args),
                              daemon=True)
    process.start()
    send.close()
    try:
        while not receive.poll(0.5) and process.is_alive():
            pass
        try:
            status, value = receive.recv()
        except EOFError:  # the child died without a word
            process.join()
            raise ResRankExportError(
                f"{what}: its process ended with exit code {process.exitcode} before returning (a negative "
                f"code is the signal that killed it; -9 is often the kernel's out-of-memory killer)") from None
        process.join()
    finally:
        if process.is_alive():  # the parent was interrupted, or the child hung up
            process.terminate()
            process.join()
    if status == "error":
        raise value
    return value
