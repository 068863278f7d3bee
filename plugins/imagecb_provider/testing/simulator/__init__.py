"""
A simulator of the kie.ai Flux Kontext image API, served over real HTTP.

It lets demos and tests exercise every path of the provider (success, each failure code, rate
limits, credits, expiring links, signed and retried callbacks, dropped connections) without the
vendor, without spending credits, and deterministically.

Start it with :func:`run_in_thread` (in-process, for tests), :func:`run_in_subprocess` (a child
process), ``python -m imagecb_provider.testing.simulator --port 8089`` (the CLI), or serve
:func:`create_app` yourself. ``docs/connections.md`` is the user guide, ``README.md`` here the reference.

Endpoints (vendor envelope ``{"code", "msg", "data"}``; ``Authorization: Bearer <api_key>``):
``POST /api/v1/flux/kontext/generate``, ``GET /api/v1/flux/kontext/record-info?taskId=``,
``GET /api/v1/chat/credit``, ``POST /api/v1/common/download-url``, files under ``/files/``.
Controls without auth: ``GET /_sim/health``, ``GET /_sim/stats`` (``?tasks=0``: without the task
map), ``GET|POST /_sim/config``, ``POST /_sim/reset``, ``POST /_sim/inject`` (``echo`` writes the
request into the error's ``msg``), ``POST /_sim/release`` (``{"task_id"}``, ``{"prompt"}`` or
``{"all": true}``: let held tasks finish), ``POST /_sim/callbacks/release`` (the same bodies:
send callbacks held by ``hold_callbacks``).

Prompt markers (case-insensitive, anywhere in the prompt; an unknown ``[sim:...]`` is a 422):

- none: success (unless ``random_failure_rate`` picks a failure: errorCode 400, 500 or 501)
- ``[sim:content_policy]``: successFlag 3, errorCode 400
- ``[sim:internal_error]``: successFlag 3, errorCode 500
- ``[sim:generation_failed]``: successFlag 3, errorCode 501
- ``[sim:create_failed]``: successFlag 2, errorCode null
- ``[sim:upstream_timeout]``: successFlag 3, errorCode 408 (its callback carries 500)
- ``[sim:flaky]``: the first accepted submission of this exact prompt fails like internal_error,
  every later one succeeds
- ``[sim:never]``: stays generating forever (no callback)
- ``[sim:hold]``: stays generating until ``POST /_sim/release``, then completes after its own
  ``[sim:latency=...]`` (none: at once) with the outcome of its other markers; its callback is
  scheduled at release
- ``[sim:latency=SECONDS]``: this task's own latency, still multiplied by ``time_factor``
- ``[sim:duplicate_callback]``: the completion callback is sent twice

The first outcome marker wins when a prompt has several; ``latency``, ``hold`` and
``duplicate_callback`` combine with any of them (``hold`` with ``never`` is a 422).

Options (:class:`SimulatorConfig` fields; change them live with ``POST /_sim/config``):

- ``api_key`` ("test-key"): the Bearer key every ``/api`` call must send, else 401
- ``latency`` (5.0): seconds from submission to completion
- ``time_factor`` (1.0): multiplies every delay the simulator waits (latency, callback retries)
- ``rate_limit_count`` (20) / ``rate_limit_window`` (10.0): accepted submissions per sliding window
  per key; over it 429 with ``Retry-After``, not queued, not charged
- ``credits`` (1000.0): starting balance; setting it live also refills the balance
- ``cost_per_image`` ({"flux-kontext-pro": 5.0, "flux-kontext-max": 10.0}); too little left: 402
- ``disabled_models`` (()): models answered with 505 "feature disabled"
- ``http_status_errors`` (False): errors as real HTTP statuses instead of HTTP 200 + body code
- ``timestamp_format`` ("iso"): createTime/completeTime as "2024-03-20T10:30:00Z" or "epoch_ms"
- ``origin_ttl`` (600.0): seconds an origin URL lives after completion (not scaled), then 410
- ``download_url_ttl`` (1200.0): seconds a link from download-url lives
- ``random_failure_rate`` (0.0) with ``seed`` (0): share of unmarked tasks that fail, reproducibly
- ``fault_rate`` (0.0) with ``fault_kinds`` (("500", "455", "drop"); also "429", with
  ``Retry-After: 1``) and ``fault_endpoints`` (("record-info",); also generate, credit,
  download-url, files): share of those calls answered 500/455/429 or cut mid-answer (a
  connection-level error for the client); never charged; "drop" with "generate" is refused
- ``submit_answer_delay`` (0.0): seconds a submission's answer is held back (not scaled); the task
  is created and charged at receipt; ``/_sim/stats`` counts ``submissions_in_flight``
- ``webhook_hmac_key`` (None): sign callbacks (``X-Webhook-Timestamp``, ``X-Webhook-Signature``)
- ``duplicate_callbacks`` (False): send every callback twice
- ``callback_retry_delays`` ((60.0, 300.0, 900.0)): waits before each callback retry (scaled)
- ``callback_timeout`` (15.0): seconds a callback receiver has to answer
- ``hold_callbacks`` (False): a callback that comes due is held (``/_sim/stats`` lists it under
  ``callbacks_held``) until ``POST /_sim/callbacks/release``; turning it off sends the held ones
"""

from __future__ import annotations

from imagecb_provider.testing.simulator.app import create_app
from imagecb_provider.testing.simulator.config import SimulatorConfig
from imagecb_provider.testing.simulator.markers import OUTCOMES
from imagecb_provider.testing.simulator.server import RunningSimulator, run_in_subprocess, run_in_thread

__all__ = [
    "OUTCOMES",
    "RunningSimulator",
    "SimulatorConfig",
    "create_app",
    "run_in_subprocess",
    "run_in_thread",
]
