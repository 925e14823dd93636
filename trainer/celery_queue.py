"""The training queue (RETRAIN_BACKEND=celery): one Celery task, `magpie.train(run_id)`, on CELERY_QUEUE.

The bot (or `magpie retrain`) creates the run's row and sends its id (`RunQueue.send`); `magpie worker`
(`trainer.worker`) takes it from the broker and carries it out. The message carries nothing but the id: settings
come from each side's own environment, progress and outcome from the row, so there is no result backend.

Delivery is at least once: tasks are acknowledged late (after the run), one at a time (prefetch 1, concurrency 1),
and a task whose worker died is delivered again. The row makes it at most once: a worker takes a run only while it
is `running` and no live worker has it (`trainer.runs.take`); a run whose worker died is failed `interrupted`.

Remote control is off on both sides (`worker_enable_remote_control`): the worker listens to its training queue
and nothing else, so whoever reaches the broker cannot shut it down, revoke its task or add a queue to it. Reaching
the broker still lets one queue runs by id: give it credentials and TLS (docs/security.md).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from core.errors import MagpieError
from core.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)

TASK_NAME = "magpie.train"
NO_TIMEOUT_VISIBILITY_S = 7 * 24 * 3600
"""Redis hands an unacknowledged task to another worker after this long: longer than any run may take."""


class QueueUnreachableError(MagpieError):
    """The broker did not take the run's task (down, wrong CELERY_BROKER_URL, refused credentials)."""


def celery_app(settings: Settings) -> Celery:
    """A Celery app on CELERY_BROKER_URL, configured for long, one-at-a-time training tasks."""
    from celery import Celery  # only where the queue is used: a local setup never loads Celery

    if settings.celery_broker_url is None:
        raise MagpieError("CELERY_BROKER_URL is not set: the training queue needs a broker")
    app = Celery("magpie", broker=settings.celery_broker_url.get_secret_value(), set_as_current=False)
    app.conf.update(_configuration(settings))
    return app


def _configuration(settings: Settings) -> dict[str, Any]:
    timeout_s = settings.retrain_timeout_minutes * 60
    visibility_s = int(timeout_s + 3600) if timeout_s > 0 else NO_TIMEOUT_VISIBILITY_S
    return {
        "task_default_queue": settings.celery_queue,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,  # a worker that dies before the run ends leaves the task to be delivered again
        "task_reject_on_worker_lost": True,  # ... also when only its pool process dies
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": visibility_s},
        "worker_hijack_root_logger": False,
        # Remote control (ping, shutdown, revoke, add_consumer, pool_restart...) listens on a broadcast queue that
        # anyone who reaches the broker can write to: with it, they could stop the worker or point it at another
        # queue. Magpie never uses it; the run's row is how a run is followed and stopped.
        "worker_enable_remote_control": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
    }


class RunQueue:
    """The bot's side of the queue: sends run ids; one broker connection pool, closed with `close`."""

    def __init__(self, settings: Settings) -> None:
        self._app = celery_app(settings)
        self._queue = settings.celery_queue

    async def send(self, run_id: int) -> None:
        """Puts the run on the queue; raises `QueueUnreachableError` when the broker does not take it."""
        try:
            await asyncio.to_thread(
                self._app.send_task,
                TASK_NAME,
                args=[run_id],
                queue=self._queue,
                retry=True,
                # a broker blip is ridden out; a broker that is down is reported within about a second
                retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0},
            )
        except Exception as exc:  # kombu raises its own OperationalError, or socket errors, depending on the broker
            reason = f"the training queue did not take run #{run_id} ({type(exc).__name__})"
            raise QueueUnreachableError(reason) from exc
        log.info("training run #%d sent to queue %s", run_id, self._queue)

    def close(self) -> None:
        self._app.close()
