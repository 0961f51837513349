"""Remote mode: the ensemble layer over existing vLLM OpenAI servers instead of an in-process engine.

`RemoteBackend` is an engine like the in-process `AsyncEngine` (see `engine/base.py`): the
service tokenizes, fans out, votes and answers exactly as in-process; only the generation and
the scoring go over HTTP to one or more
`python -m vllm.entrypoints.openai.api_server --enable-lora --lora-modules NAME=PATH ...`
servers, each serving some of the members under the member's name.

One module per concern:

* `wire.py`: request bodies, the stream's deltas folded into outputs shaped like vLLM's,
  token ids, scoring answers, and how a server's errors map to the service's;
* `servers.py`: one server as the backend holds it (client, gate, what it serves, up or down);
* `discovery.py`: `GET /v1/models`, `POST /tokenize` and `GET /server_info` of each server;
* `routing.py`: which up server a member's request goes to, and which members are unavailable;
* `liveness.py`: servers marked down and up, the backoff of retries, the monitor;
* `calls.py`: generation and scoring over HTTP, each server's gate held around them;
* `backend.py`: `RemoteBackend`, which composes them.
"""

from ensemble_serve.engine.remote.backend import RemoteBackend
from ensemble_serve.engine.remote.discovery import RemoteDiscoveryError
from ensemble_serve.engine.remote.servers import RemoteServer, normalize_url
from ensemble_serve.engine.remote.wire import (
    RemoteCompletion,
    RemoteError,
    RemoteLogprob,
    RemoteRequestOutput,
    request_body,
)

__all__ = [
    "RemoteBackend",
    "RemoteCompletion",
    "RemoteDiscoveryError",
    "RemoteError",
    "RemoteLogprob",
    "RemoteRequestOutput",
    "RemoteServer",
    "normalize_url",
    "request_body",
]
