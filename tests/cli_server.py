"""The docpipe CLI for tests, one process per command, forked from a server that has already imported what the CLI
imports (torch, transformers, PyMuPDF, pyarrow, pipeline).

A command line run by ``tests.conftest.run_cli`` spent most of its time importing: about 6 s of a 7 s local run on
an idle 2-core machine, and more under a loaded one, some 80 times a suite. Here each command still runs in a process
of its own, with its own environment, working directory, stdout and stderr, exit code and ``atexit`` handlers; only
the imports are done once. The server is started from a fresh interpreter (not forked from pytest's threaded worker),
imports no Ray (Ray reads some of its settings from the environment when imported), starts no Python thread and
runs no torch operation (OpenMP's threads start with the first one and would not survive the fork). A command
whose subject is the process itself (other import paths, its command line) runs in a fresh interpreter:
``tests.conftest.start_cli`` decides.

Protocol: requests come on a Unix socket (SOCK_SEQPACKET, a message each), ``{"id", "argv", "env", "cwd",
"new_session"}`` with the command's stdin, stdout and stderr as descriptors (SCM_RIGHTS: the test's own pipes, so
reading them is reading a subprocess's); replies go out on stdout, a JSON line each: ``{"id", "pid"}`` once the
child is forked and ``{"id", "rc"}`` when it has ended (a negative rc: killed by that signal, as subprocess says).
"""

from __future__ import annotations

import json
import os
import sys

# What a `docpipe run` imports besides Ray, lazily or not (python -X importtime on a local run).
PRELOAD = [
    "torch", "torchvision", "PIL.Image", "pyarrow", "pyarrow.parquet", "pyarrow.fs", "pyarrow.dataset", "pydantic",
    "pymupdf", "pypdfium2", "transformers", "transformers.models.idefics2.modeling_idefics2",
    "transformers.models.idefics2.processing_idefics2", "transformers.models.idefics2.image_processing_idefics2",
    "transformers.generation", "docpipe.cli", "docpipe.execute.run", "docpipe.execute.local",
    "docpipe.execute.stages", "docpipe.model.load", "docpipe.model.generation", "docpipe.model.continuous",
    "docpipe.render.document", "docpipe.render.isolated", "docpipe.extract.stage", "docpipe.output.writer",
]


def _child(request: dict, fds: list[int], inherited: list[int]) -> None:
    """In the forked child: become the command's process, run it, exit as the interpreter would."""
    import atexit
    import threading
    import traceback

    code = 1
    try:
        for fd in inherited:  # the server's own descriptors are no business of the command
            os.close(fd)
        for target, fd in enumerate(fds):  # stdin, stdout, stderr
            os.dup2(fd, target)
            os.close(fd)
        if request.get("new_session"):
            os.setsid()
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["docpipe", *request["argv"]]
        from docpipe.cli import main

        code = main(request["argv"])
    except SystemExit as exc:  # argparse's usage errors, as `python -m docpipe.cli` would exit
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            threading._shutdown()  # what the interpreter does at exit: wait for non-daemon threads, then atexit
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)


def _reply(message: dict) -> None:
    os.write(1, (json.dumps(message) + "\n").encode())  # unbuffered: nothing half-written is copied into a child


def main(sock_fd: int) -> None:
    import importlib
    import selectors
    import signal
    import socket
    import threading

    for name in PRELOAD:
        importlib.import_module(name)
    assert "ray" not in sys.modules, "the CLI server must not import Ray"
    # No Python thread may run here: it would not survive the fork. (The native threads these imports start,
    # jemalloc's and MuPDF's, are fork-aware: our render forkserver and PyTorch's DataLoader fork after them too.)
    assert threading.active_count() == 1, "the CLI server must not start a thread"
    sock = socket.socket(fileno=sock_fd)
    _reply({"ready": True})
    running: dict[int, int] = {}
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    open_for_requests = True
    while open_for_requests or running:
        for key, _ in selector.select():
            if key.fileobj is wake_r:
                os.read(wake_r, 4096)
                continue
            message, fds, _, _ = socket.recv_fds(sock, 1 << 20, 3)
            if not message:  # the test worker is gone or done: finish what runs, take nothing new
                open_for_requests = False
                selector.unregister(sock)
                continue
            request = json.loads(message)
            pid = os.fork()
            if pid == 0:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                selector.close()
                _child(request, fds, [wake_r, wake_w, sock.fileno()])
            for fd in fds:
                os.close(fd)
            running[pid] = request["id"]
            _reply({"id": request["id"], "pid": pid})
        while running:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            _reply({"id": running.pop(pid), "rc": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    main(int(sys.argv[1]))
