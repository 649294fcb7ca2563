"""Application assembly: :class:`AppState` (model, engine, prompt registry/store, metrics) and :func:`create_app`.

Start-up order (FastAPI lifespan): load the model (unless one was passed in), start the engine thread, scan the
prompt directory, start the watcher; ``/ready`` turns 200 after that. Shut-down reverses it; before it,
:meth:`AppState.drain` (``softprompt serve`` runs it on SIGTERM) lets running requests finish.

Middleware, outermost first: request accounting (:mod:`server.api.accounting`), the admin gate and listener split
(:mod:`server.api.admin_gate`), the inference gate (API key, body size: :mod:`server.api.inference_gate`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI

from prompt_store.location import open_store
from prompt_store.registry import PromptRegistry, SoftPrompt
from prompt_store.remote import RemoteStore
from prompt_store.store import PromptStore
from server import __version__
from server.api import admin, generate, openai_compat, ops
from server.api.accounting import RequestAccounting
from server.api.admin_gate import AdminGate
from server.api.errors import install_error_handlers
from server.api.inference_gate import InferenceGate
from server.api.openapi import install_openapi
from server.config import Settings
from server.engine import Engine
from server.metrics import Metrics
from server.model_loader import LoadedModel, load_model

log = logging.getLogger(__name__)

#: After a drain ended the remaining requests, seconds to wait for their last bytes before giving up on them.
STUCK_SECONDS = 10.0
#: Most seconds :meth:`AppState.stop` waits for the prompt store's thread, then for the engine loop.
STOP_STORE_SECONDS, STOP_ENGINE_SECONDS = 5.0, 10.0


@dataclass
class AppState:
    """Everything the routers need, reachable through ``request.app.state.sp`` (see :mod:`server.api.deps`)."""

    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    registry: PromptRegistry = field(default_factory=PromptRegistry)
    loaded: LoadedModel | None = None
    engine: Engine | None = None
    store: PromptStore | RemoteStore | None = None
    ready: bool = False
    draining: bool = False  # set once by drain(): /ready 503, new requests 503
    in_flight: int = 0  # generation requests inside the app (server.api.accounting), event-loop thread only
    # admin uploads and deletes run here, not in asyncio's default executor, which tokenizes inputs: a slow or
    # unreachable object store then holds up admin calls only, never inference
    store_executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=2, thread_name_prefix="prompt-store-io"))
    engine_on_caller: bool = False  # the engine loop runs on the thread that calls Engine.run_forever (serve)

    def start(self) -> None:
        """Blocking start-up (run in a worker thread by the lifespan)."""
        s = self.settings
        if self.loaded is None:
            self.loaded = load_model(s.model, cache_dir=s.cache_dir, device=s.device, dtype=s.dtype)
        if s.torch_threads:
            import torch

            torch.set_num_threads(s.torch_threads)
        self.engine = Engine(self.loaded, s.engine_config(), self.metrics)
        self.engine.start(background=not self.engine_on_caller)
        m = self.metrics
        m.prompts_loaded.set_function(lambda: len(self.registry))
        self.store = open_store(
            s.prompts,
            self.registry,
            self.loaded.prompt_limits(s.max_virtual_tokens, s.max_prompt_bytes),
            on_load=self._on_load,
            on_error=self._on_error,
            poll_interval=s.prompts_poll_interval,
        )
        if s.prompts is None and s.memory_prompts and s.admin_token is not None:
            log.warning("no --prompts directory and --memory-prompts: admin uploads are kept in memory only and "
                        "lost on restart")
        if s.prompts is not None:
            stats = self.store.scan()
            log.info("prompt scan of %s: %s", s.prompts, stats)
            if s.watch:
                self.store.start_watching()
        self.ready = True

    def drain(self, timeout: float, poll: float = 0.05) -> int:
        """Graceful shutdown's first half (any thread; ``softprompt serve`` runs it on SIGTERM): from now on
        ``/ready`` is 503 and new requests get 503 ``draining`` (also those past the route's first check, still being
        tokenized: the engine is closed to new submissions); requests already accepted get up to ``timeout``
        seconds to finish, then the engine ends the rest with finish reason "shutdown" (their text so far is kept and
        sent). Returns once no generation request is inside the app any more (its last byte sent), or
        ``STUCK_SECONDS`` after the timeout if the engine loop is stuck: the number of requests the timeout ended.

        Args:
            timeout: seconds running requests get, from the call.
            poll: seconds between checks.
        """
        self.draining = True
        engine = self.engine
        if engine is None:
            return 0
        engine.close()
        deadline = time.monotonic() + timeout

        def busy() -> bool:
            return bool(engine.num_open or self.in_flight) and engine.alive

        while busy() and time.monotonic() < deadline:
            time.sleep(poll)
        cut = engine.num_open
        if cut:
            log.warning("drain timeout of %.1f s over: ending %d requests with finish_reason 'shutdown'", timeout, cut)
            engine.end_all()
        stuck = time.monotonic() + STUCK_SECONDS
        while busy() and time.monotonic() < stuck:
            time.sleep(poll)
        log.info("drained: %d requests ended by the drain timeout", cut)
        return cut

    def stop(self) -> None:
        """Shut-down's second half (the lifespan's): stop the prompt store's watcher or poller (at most
        ``STOP_STORE_SECONDS``), then the engine (at most ``STOP_ENGINE_SECONDS``)."""
        self.ready = False
        self.store_executor.shutdown(wait=False, cancel_futures=True)
        if self.store is not None:
            self.store.stop(STOP_STORE_SECONDS)
        if self.engine is not None:
            self.engine.stop(STOP_ENGINE_SECONDS)

    def _on_load(self, prompt: SoftPrompt, action: str) -> None:
        if action in ("created", "replaced"):
            self.metrics.prompt_loads.labels(action).inc()
            if self.engine is not None:
                self.engine.prefetch(prompt)  # its virtual-token KV, computed while the engine is idle
        log.info("prompt %s v%d %s (%d virtual tokens)", prompt.task, prompt.version, action,
                 prompt.num_virtual_tokens)

    def _on_error(self, entry: str, error: Exception) -> None:
        self.metrics.prompt_load_errors.labels(getattr(error, "reason", "error")).inc()
        log.warning("prompt entry %s skipped: %s", entry, error)


def create_app(settings: Settings | None = None, *, loaded: LoadedModel | None = None,
               engine_on_caller: bool = False) -> FastAPI:
    """Build the FastAPI app.

    Args:
        settings: configuration (default: read from the environment).
        loaded: an already loaded model (tests pass a tiny one); None loads ``settings.model``.
        engine_on_caller: the lifespan starts the engine without a loop thread; the caller runs
            ``app.state.sp.engine.run_forever()`` (``softprompt serve`` does, on the main thread).
    """
    state = AppState(settings or Settings(), loaded=loaded, engine_on_caller=engine_on_caller)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(state.start)
        try:
            yield
        finally:
            await asyncio.to_thread(state.stop)

    app = FastAPI(
        title="softprompt-server",
        version=__version__,
        description="One frozen LLM, many tasks, each a soft prompt, served in mixed-task continuous batches.",
        lifespan=lifespan,
        openapi_url="/openapi.json" if state.settings.docs else None,
        docs_url=None,  # server.api.docs serves /docs with packaged (offline) assets
        redoc_url=None,  # its assets would come from a CDN
    )
    app.state.sp = state
    app.add_middleware(InferenceGate)  # add_middleware puts each one outside those before it
    app.add_middleware(AdminGate)
    app.add_middleware(RequestAccounting)
    install_error_handlers(app)
    app.include_router(generate.router)
    app.include_router(openai_compat.router)
    app.include_router(admin.router)
    app.include_router(ops.router)
    install_openapi(app)  # OpenAPI document from server.api.openapi.ROUTES; /docs when settings.docs
    return app
