"""Serve a checkpoint as an action server: WebSocket transport, msgpack messages, no pickle.

Start it with ``cm-policy serve checkpoint=PATH [host=127.0.0.1 port=8765 max_batch=64
batch_wait_ms=2 threads=1 max_infer_steps=100 max_message_mb=16 weights=ema]``
(defaults: ``config/serve/default.yaml``), or with ``cm-policy serve model=policy.onnx`` for a
policy exported by ``cm-policy export`` (:mod:`cm_policy.export`), which ONNX Runtime runs
without torch: that server imports no torch at all (``backend=auto`` picks onnx for ``model=`` or
a ``.onnx`` path, torch otherwise; see :mod:`cm_policy.serve.backend`). The server loads the
checkpoint (safetensors + JSON) or model, listens, warms up, then answers; ``GET /healthz`` on
the same port returns 200 ``ok`` once it is ready and 503 while warming up or shutting down.
SIGTERM (or Ctrl-C) stops new work, lets in-flight requests reply, closes the sessions and exits
with 0.

Protocol (version 1). Every message is a binary msgpack map with a ``type``; arrays travel as
``{"__ndarray__": true, "dtype": "float32", "shape": [...], "data": <raw little-endian bytes>}``.

- ``hello`` [``protocol``] -> ``metadata``: ``observations`` {key: {shape, dtype}}, ``action_dim``,
  ``horizon``, ``n_obs_steps``, ``n_action_steps``, ``control_hz``, ``method``,
  ``default_steps``, ``samplers``, ``default_sampler``, ``max_infer_steps``, ``max_batch``,
  ``max_message_bytes``, ``obs_limit``, ``infer_modes``, ``backend`` (``torch`` | ``onnx``),
  ``fixed_steps`` (the onnx backend's exported number of steps, the only one it runs; null for
  torch).
- ``reset`` -> starts an episode of this session: its window is emptied, and the next observation
  fills all ``n_obs_steps`` slots (as Diffusion Policy's runner does at env reset).
- ``observe`` ``obs`` -> pushes one observation per key, (B, *shape) or unbatched (*shape).
- ``infer`` ``obs`` [``mode`` ``steps`` ``sampler`` ``seed``] -> ``action``
  (B, n_action_steps, action_dim), or (n_action_steps, action_dim) for an unbatched
  observation, and ``timing`` (``queue_ms``, ``compute_ms``, ``server_ms``, ``batch_rows``,
  ``batch_requests``). ``mode="step"`` (default) pushes ``obs`` as ``observe`` does and infers
  from the session's window; ``mode="window"`` takes ``obs`` as the window itself,
  (B, >=n_obs_steps, *shape), and leaves the session's window alone. ``steps`` and ``sampler``
  override the method's number of network evaluations and sampler kind (one of the metadata's
  ``samplers``; the onnx backend refuses steps other than its ``fixed_steps``); ``seed`` draws
  the noise from ``torch.Generator().manual_seed(seed)``, for actions equal to the in-process
  policy's (bitwise with the torch backend; the onnx backend draws the same noise with numpy,
  :mod:`cm_policy.serve.noise`, and its actions equal torch's to float rounding, about 1e-6 of
  the action range).
- ``health`` -> ``ready``, ``sessions``, ``in_flight``, ``requests``, ``passes``, ``refused``.

A request beyond the session's ``max_rate`` gets an error reply (the session goes on); the
metadata also carries ``max_sessions`` and ``max_rate``.

Actions are never sent unless finite: a request whose rows give NaN or inf actions, or whose
observations lie beyond ``obs_limit`` half-ranges of the training data (``serve.obs_limit``, off by
default), gets an error reply saying why, counted in ``health``'s ``refused``.

Order: ``health`` at any time; ``hello`` before anything else; ``reset`` before the first
step-mode ``observe``/``infer`` of an episode (window mode needs no reset). The batch size (or
unbatched form) stays fixed within an episode. A malformed or out-of-order message gets
``{"type": "error", "ok": false, "request", "error", "expected", "got"}`` and the session goes
on. Messages above ``max_message_bytes`` are refused with such a reply, and those above twice
that are cut off by the transport (close code 1009).

Requests of all sessions are micro-batched (see :mod:`cm_policy.serve.batching`) on one worker
thread, off the event loop. The client, :class:`PolicyClient`, needs only numpy, msgpack and
websockets (no torch); the server is :mod:`cm_policy.serve.server`.

Exposing the server. It binds to 127.0.0.1 by default, so only processes on the same machine
reach it. To serve other machines, give it a token and TLS: ``cm-policy serve checkpoint=RUN
host=0.0.0.0 token_file=token.txt tls_cert=cert.pem tls_key=key.pem``; clients connect with
``PolicyClient("wss://gpu-host:8765", token=..., ca="cert.pem")``. The token is checked before
the WebSocket upgrade (HTTP 401 without it), in constant time, and never logged; a host beyond
the loopback without a token is refused unless ``insecure=true``; ``max_sessions`` and
``max_rate`` keep one client from starving the others (:mod:`cm_policy.serve.security`).
Messages are never unpickled, so a hostile client can at worst be refused.
"""

from cm_policy.serve.client import PolicyClient, ServerError, ServerRefused

__all__ = ["PolicyClient", "ServerError", "ServerRefused"]
