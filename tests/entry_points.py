"""``python launch/X.py ...`` as the tests run it, without paying torch's and DeepSpeed's imports
again for every run.

A run of an entry point that stops on bad input spends ~5 s importing before it fails in well
under one. :class:`PreloadedPython` starts one helper process (this file run as a script) that
imports the given modules once, then forks one child per :meth:`~PreloadedPython.run`: the child
takes the run's working directory, environment, argv, stdin (/dev/null), stdout and stderr, and
runs the script as ``__main__`` in this file's main block, so the interpreter itself ends it as
it ends ``python launch/X.py``: the same exit status (``sys.exit``'s code, 1 with the traceback
on stderr for an uncaught exception), atexit handlers, flushed output. Every run is still its own
process, forked from a helper that never runs anything but imports: no process group, environment
or other global state passes from one run to the next. What the imports themselves print (e.g.
DeepSpeed's accelerator warning) goes to the helper's stderr, once, not to each run's; what they
read from the environment (e.g. ``DS_ACCELERATOR``) is the helper's: runs may differ only in
variables read after the imports.
"""
import gc
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import tempfile


class PreloadedPython:
    """A ``python`` that has already imported ``modules``: :meth:`run` is ``subprocess.run([
    sys.executable, *args], capture_output=True, text=True, ...)`` with the imports paid once."""

    def __init__(self, *modules: str):
        self._helper = subprocess.Popen([sys.executable, __file__, *modules], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)

    def run(self, args: list[str], cwd: str, env: dict, timeout: float
            ) -> subprocess.CompletedProcess:
        """``python *args`` (``args[0]`` a script) in ``cwd`` with exactly the environment ``env``;
        the finished process. After ``timeout`` seconds the run is killed and
        subprocess.TimeoutExpired raised."""
        request = {"args": args, "cwd": cwd, "env": env, "timeout": timeout}
        try:
            self._helper.stdin.write(json.dumps(request) + "\n")
            self._helper.stdin.flush()
            reply = self._helper.stdout.readline()
        except BrokenPipeError:
            reply = ""
        if not reply:
            raise RuntimeError(f"the helper process ended with status {self._helper.wait()} "
                               f"(its stderr is in the captured output)")
        reply = json.loads(reply)
        if reply["timed_out"]:
            raise subprocess.TimeoutExpired([sys.executable, *args], timeout, reply["stdout"],
                                            reply["stderr"])
        return subprocess.CompletedProcess([sys.executable, *args], reply["returncode"],
                                           reply["stdout"], reply["stderr"])

    def close(self) -> None:
        self._helper.stdin.close()  # the helper's signal to exit
        try:
            self._helper.wait(timeout=60)
        except subprocess.TimeoutExpired:  # still waiting on a run (the test was interrupted)
            self._helper.kill()
            self._helper.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _serve(modules: list[str]) -> tuple[dict, object, object]:
    """The helper: import ``modules``, then fork a child per request on stdin and answer with its
    exit status and output on stdout. Returns, in a child only, the request and the files its
    stdout and stderr go to."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what the imports print is not a reply
    del sys.path[0]  # tests/, where the scripts' imports are not looked up
    for name in modules:
        __import__(name)
    # the collector leaves what the imports built to the helper: it would otherwise traverse it
    # in each run, and again as the run exits (~1.5 s a run after torch and DeepSpeed)
    gc.freeze()
    for line in sys.stdin:
        request = json.loads(line)
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            replies.close()
            return request, out, err
        # the child's exit, or the timeout (as subprocess.run: the child is killed)
        pidfd = os.pidfd_open(pid)
        timed_out = not select.select([pidfd], [], [], request["timeout"])[0]
        if timed_out:
            os.kill(pid, signal.SIGKILL)
        os.close(pidfd)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read().decode())
            f.close()
        replies.write(json.dumps({"returncode": status, "stdout": texts[0], "stderr": texts[1],
                                  "timed_out": timed_out}) + "\n")
        replies.flush()
    sys.exit(0)  # stdin closed: the tests are done


if __name__ == "__main__":
    request, out, err = _serve(sys.argv[1:])
    # this child becomes `python SCRIPT ARGS` started in the request's folder and environment
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    script = request["args"][0]
    sys.argv = request["args"]
    sys.path.insert(0, os.path.dirname(os.path.realpath(script)))
    runpy.run_path(script, run_name="__main__")  # sys.argv[0]: the script as given
