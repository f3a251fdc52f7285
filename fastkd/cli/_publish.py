"""A command's result files written as one set: each made in a staging directory beside them, then
all moved into place with SIGINT and SIGTERM held, so a Ctrl-C leaves the old set or the new one,
never a mix of the two."""
import os
import shutil
import signal
import tempfile


def publish(out_dir: str, files: dict) -> None:
    """files: name -> bytes, or a callable(path) that writes the file at `path` (a plot)."""
    stage = tempfile.mkdtemp(prefix=".publishing-", dir=out_dir)
    try:
        for name, what in files.items():
            path = os.path.join(stage, name)
            if callable(what):
                what(path)
            else:
                with open(path, "wb") as f:
                    f.write(what)
                    f.flush()
                    os.fsync(f.fileno())
        held = [signal.SIGINT, signal.SIGTERM]
        old = signal.pthread_sigmask(signal.SIG_BLOCK, held)  # (renames only: a few microseconds)
        try:
            for name in files:
                os.replace(os.path.join(stage, name), os.path.join(out_dir, name))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
