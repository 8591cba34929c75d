"""`latentforge serve`: AUTOMATIC1111's HTTP API (/sdapi/v1/...) and a web page, over Pipeline.generate.

The routes take AUTOMATIC1111's request fields and answer in its shapes, so that its clients work
unchanged. Fields this server does not implement (face restoration, scripts, extensions, variation
seeds, ...) are accepted and ignored; a field it uses with a wrong value is HTTP 422 naming it. Routes
that need a part latentforge lacks (interrogate, embedding and hypernetwork training) answer 501 with
what to use instead.

One worker thread runs the jobs one at a time, in the order they came; each request waits for its
own job. Interrupt stops the running job only; a client that disconnects while waiting takes its job
out of the queue (and stops it if it was running). Image i of a request uses seed + i, as in
Pipeline.generate, so every image is the one its seed makes alone.

Safe by default: a loopback address, HTTP Basic auth on every route with --api-auth (constant-time
compare), a body-size limit, images checked from their header before decoding, cross-origin
requests refused unless allowed, a loopback server answering only to loopback host names (DNS
rebinding), and no request field ever used as a file path.

- `jobs.py`: the configured models, and the worker that runs their jobs one at a time
- `a1111.py`: AUTOMATIC1111's requests -> generate() calls, and the results -> its responses
- `guard.py`: the ASGI middleware in front of every route (host, origin, auth, body size)
- `app.py`: the FastAPI app, its routes and the web page; `serve`; `ServerThread`
"""

from .app import ServerThread, Settings, create_app, serve
from .jobs import Interrupted

__all__ = ["Interrupted", "ServerThread", "Settings", "create_app", "serve"]
