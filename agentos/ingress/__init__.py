"""HTTP ingress: webhooks and health checks served by the daemon (``--http HOST:PORT``).

Outside systems (CI, ticketing, chat ops) wake agents by POSTing a message, answer
waiting tasks (``GET /v1/pending``, ``POST /v1/agents/{name}/tasks/{task}/answer``),
drop a poison message (``POST /v1/agents/{name}/tasks/{task}/drop``) and send them
events (``POST /v1/agents/{name}/events/{event}``); load
balancers and orchestrators ask ``/healthz`` and ``/readyz``. The app is Starlette on
uvicorn, and every request goes through :class:`agentos.client.Client` and its store, so
a webhook is `agentos send`: same validation, same size and depth limits (a full inbox
answers 429 with ``Retry-After``), same idempotency keys (a key reused with another
body answers 409 with the first task's id).

It runs on the daemon's event loop, next to lease renewal, and it is reachable by more
than its operator, so it refuses what it cannot trust before doing any work:

- Bearer-token auth is required unless the server is bound to loopback; the token is
  compared in constant time and never logged. Without a token, a loopback port is
  still reachable from any web page the operator's browser shows (cross-site posts)
  and, through DNS rebinding, readable by one: so only ``Host`` values naming the
  bound address or localhost are served, and a request whose ``Origin`` is another
  site, or whose ``Sec-Fetch-Site`` says cross-site or same-site, is refused (403).
- The answer and event endpoints take ``application/json`` only (a browser cannot send
  that cross-site without a preflight); messages take any text, as ``curl -d`` sends.
- Every body is capped before it is read (``Content-Length``, then a streamed count),
  a message at its agent's own inbox limit; a body that stalls times out (408); JSON
  nesting is bounded; text that reaches events and terminals (``by``, event names)
  may hold no control characters.
- List endpoints are paginated and read one page of the fleet per request.

The package splits it by job: :mod:`~agentos.ingress.trust` (who is served: the ``Host``,
``Origin`` and control-character checks, shared with the CLI), :mod:`~agentos.ingress.bounds`
(bounded bodies, JSON, pages and errors), :mod:`~agentos.ingress.endpoints` (what each
route does) and :mod:`~agentos.ingress.app` (routes, auth, errors as statuses).
"""

from agentos.ingress.app import build_app
from agentos.ingress.bounds import MAX_JSON_BYTES, MAX_JSON_DEPTH, parse_json
from agentos.ingress.trust import CONTROL_CHARS, has_control, is_loopback, refusal

__all__ = [
    "CONTROL_CHARS",
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "build_app",
    "has_control",
    "is_loopback",
    "parse_json",
    "refusal",
]
