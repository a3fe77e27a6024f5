"""NDIF's endpoints, as nnsight 0.8's `RemoteBackend` uses them, on tornado.

- `GET /ping`: "pong".
- websocket `/subscribe`: the first frame is `{"session_id": ...}`; then the status updates of the
  jobs posted with that session id (JSON text frames) and, on COMPLETED, the `torch.save`d
  `ResponseModel` carrying the result blob (a binary frame).
- `POST /request`: multipart, form field `data` = the `RequestModel` envelope (JSON), file `blob` = the
  serialized block; headers `ndif-api-key`, `nnsight-version`. Answers the RECEIVED `ResponseModel`
  (JSON), or an HTTP error with `{"detail": ...}`: 401 bad key, 426 nnsight version, 413 too large,
  404 model not hosted.
- `GET /response/{id}`: a job's latest status, for clients that poll (`blocking=False`); a COMPLETED
  status carries the url `GET /result/{id}` to download the result from.
"""

import asyncio
import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import nnsight
from nnsight.schema.request import RequestModel
from nnsight.schema.response import ResponseModel, Status
from pydantic import ValidationError
from tornado import web, websocket

from jobs import Hosted, NotHosted, describe, execute, repo_id


class Server:
    """The server's state: its models, limits, open sessions and jobs."""

    def __init__(self, models: dict[str, Hosted], api_key: str, max_bytes: int, time_limit: float):
        self.models, self.api_key, self.max_bytes, self.time_limit = models, api_key, max_bytes, time_limit
        self.sessions: dict[str, websocket.WebSocketHandler] = {}
        self.statuses: dict[str, ResponseModel] = {}  # job id -> latest status (for polling clients)
        self.results: dict[str, bytes] = {}  # job id -> result blob (for polling clients)
        self.worker = ThreadPoolExecutor(max_workers=1)  # one job at a time, as one NDIF model actor
        self.base_url = ""  # set once the port is known

    def version_error(self, client: str) -> str | None:
        """Why a client with nnsight version `client` is refused (NDIF accepts one minor series), or None."""
        ours = nnsight.__version__.split(".")[:2]
        if client.split(".")[:2] != ours:
            return (f"nnsight {client or '(unknown)'} is not supported: this server runs nnsight {nnsight.__version__} "
                    f"and accepts clients {'.'.join(ours)}.x")
        return None

    async def run(self, job: str, session: str, hosted: Hosted, blob: bytes, request: RequestModel) -> None:
        """Run a job in the worker, then report COMPLETED (with the result) or ERROR to its client."""
        self.report(ResponseModel(id=job, status=Status.RUNNING, description="Your job has started running."), session)
        loop = asyncio.get_running_loop()
        try:
            data = await asyncio.wait_for(loop.run_in_executor(self.worker, execute, hosted, blob, request),
                                          self.time_limit)
        except asyncio.TimeoutError:
            message = f"TimeoutError: the job ran longer than this server's limit of {self.time_limit:g} s"
            self.report(ResponseModel(id=job, status=Status.ERROR, description=message), session)
            return
        except Exception as error:  # the block's own error: its traceback goes back to the client
            self.report(ResponseModel(id=job, status=Status.ERROR, description=describe(error)), session)
            return
        self.results[job] = data
        done = "Your job has been completed."
        self.statuses[job] = ResponseModel(id=job, status=Status.COMPLETED, description=done,
                                           data=f"{self.base_url}/result/{job}")
        if session in self.sessions:
            blocking = ResponseModel(id=job, status=Status.COMPLETED, description=done, data=data)
            self.sessions[session].write_message(blocking.pickle(), binary=True)

    def report(self, response: ResponseModel, session: str) -> None:
        self.statuses[response.id] = response
        if session in self.sessions:
            self.sessions[session].write_message(response.model_dump_json())


class _Handler(web.RequestHandler):
    def initialize(self, server: Server):
        self.server = server

    def refuse(self, status: int, detail: str) -> None:
        self.set_status(status)
        self.finish({"detail": detail})

    def key_ok(self) -> bool:
        if self.request.headers.get("ndif-api-key") == self.server.api_key:
            return True
        self.refuse(401, "Invalid or missing API key.")
        return False


class Ping(_Handler):
    def get(self):
        self.finish("pong")


class Subscribe(websocket.WebSocketHandler):
    def initialize(self, server: Server):
        self.server = server
        self.session = uuid.uuid4().hex

    def prepare(self):
        if self.request.headers.get("ndif-api-key") != self.server.api_key:
            self.set_status(401)
            self.finish({"detail": "Invalid or missing API key."})

    def open(self):
        self.server.sessions[self.session] = self
        self.write_message(json.dumps({"session_id": self.session}))

    def on_close(self):
        self.server.sessions.pop(self.session, None)


class Submit(_Handler):
    async def post(self):
        server = self.server
        if not self.key_ok():
            return
        refused = server.version_error(self.request.headers.get("nnsight-version", ""))
        if refused:
            return self.refuse(426, refused)
        blob = self.request.files.get("blob", [{}])[0].get("body", b"")
        if len(blob) > server.max_bytes:
            return self.refuse(413, f"the request is {len(blob):,} bytes; this server accepts at most "
                                    f"{server.max_bytes:,}")
        try:
            request = RequestModel.model_validate_json(self.get_body_argument("data"))
        except (web.MissingArgumentError, ValidationError) as error:
            return self.refuse(400, f"malformed request envelope: {error}")
        try:
            name = repo_id(request.model_key)
            hosted = server.models[name]
        except NotHosted as error:
            return self.refuse(404, str(error))
        except KeyError:
            return self.refuse(404, f"{name} is not hosted here; this server hosts {', '.join(sorted(server.models))}")
        job = uuid.uuid4().hex
        received = ResponseModel(id=job, status=Status.RECEIVED, description="Your job has been received.")
        server.statuses[job] = received
        self.finish(received.model_dump_json())
        await server.run(job, request.session_id, hosted, blob, request)


class Poll(_Handler):
    def get(self, job: str):
        if not self.key_ok():
            return
        if job not in self.server.statuses:
            return self.refuse(404, f"no job {job}")
        self.finish(self.server.statuses[job].model_dump_json())


class Result(_Handler):
    def get(self, job: str):
        if job not in self.server.results:
            return self.refuse(404, f"no result for job {job}")
        self.set_header("Content-Type", "application/octet-stream")
        self.finish(self.server.results[job])


def application(server: Server) -> web.Application:
    state = {"server": server}
    return web.Application([
        (r"/ping", Ping, state),
        (r"/subscribe", Subscribe, state),
        (r"/request", Submit, state),
        (r"/response/([0-9a-f]+)", Poll, state),
        (r"/result/([0-9a-f]+)", Result, state),
    ])
