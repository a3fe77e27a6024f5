"""The test server's process: `python -I -S serve.py --site DIR --api-key KEY --model NAME=FOLDER[@DELAY] ...`.

`-I` ignores PYTHONPATH and the user's site-packages, `-S` skips site-packages' `.pth` files (an
editable install of interplab is one). The site-packages folders holding torch, nnsight and tornado
are added by path, and a finder refuses `import interplab` even where it is installed there:
interplab is not installed on NDIF either. Binds 127.0.0.1 only, on a free port, and prints
`READY <port>` once it listens.
"""

import argparse
import asyncio
import importlib.abc
import sys
from pathlib import Path


class NotInstalled(importlib.abc.MetaPathFinder):
    """Refuses to import interplab, as a server without it would."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "interplab":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def _arguments():
    parser = argparse.ArgumentParser()
    parser.add_argument("--site", action="append", default=[], help="a site-packages folder to import from")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--model", action="append", default=[], help="NAME=FOLDER or NAME=FOLDER@DELAY_SECONDS")
    parser.add_argument("--max-bytes", type=int, default=4_000_000, help="largest request blob accepted")
    parser.add_argument("--time-limit", type=float, default=60.0, help="longest a job may run, in seconds")
    return parser.parse_args()


async def main() -> None:
    args = _arguments()
    sys.path[:0] = [str(Path(__file__).parent)]
    sys.path += args.site
    sys.meta_path.insert(0, NotInstalled())

    import torch
    from tornado import httpserver, netutil

    from app import Server, application
    from jobs import Hosted

    torch.set_num_threads(1)
    models = {}
    for spec in args.model:
        name, _, where = spec.partition("=")
        folder, _, delay = where.partition("@")
        models[name] = Hosted(folder, float(delay or 0))
    server = Server(models, args.api_key, args.max_bytes, args.time_limit)
    sockets = netutil.bind_sockets(0, address="127.0.0.1")  # loopback only, a free port
    port = sockets[0].getsockname()[1]
    server.base_url = f"http://127.0.0.1:{port}"
    # Bodies up to 4x the cap are read, so an over-cap request gets a 413 with a reason, not a dropped connection.
    httpserver.HTTPServer(application(server), max_body_size=4 * args.max_bytes).add_sockets(sockets)
    print(f"READY {port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
