"""The server's subcommands of ``softprompt``: ``serve``, ``prepare-model`` and ``upload``.

:func:`register` adds them to the root command (:mod:`softprompt_cli`); this module never imports ``training`` or
``bench``, which add their own. ``serve``'s flags are generated from :class:`server.config.Settings`, so each flag
has the same name, default and environment variable (``SOFTPROMPT_<FIELD>``) as its setting; a flag given on the
command line wins.
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing

from pydantic import SecretStr

from server.config import Settings

#: After a drain, seconds uvicorn waits for open connections to finish writing their last responses.
FLUSH_SECONDS = 5
#: Worst case, seconds from the end of the drain timeout to the exit: a stuck engine (server.app.STUCK_SECONDS), the
#: flush, then the lifespan's stops (STOP_STORE_SECONDS, STOP_ENGINE_SECONDS). A supervisor must wait
#: --drain-timeout + this before SIGKILL: 60 s with the defaults (tests/deploy check the manifests against it).
SHUTDOWN_SLACK_SECONDS = 30


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for name, info in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"SOFTPROMPT_{name.upper()}"
        default = info.get_default(call_default_factory=True)
        shown = "" if default is None or isinstance(default, SecretStr) else f" (default: {default})"
        helptext = f"{info.description or ''}{shown} [env {env}]".strip()
        if info.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=helptext)
            continue
        choices = None
        ann = info.annotation
        if typing.get_origin(ann) is typing.Literal:
            choices = list(typing.get_args(ann))
        parser.add_argument(flag, dest=name, default=None, choices=choices, help=helptext)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from flags given (others from the environment, then defaults). Raises pydantic's
    ValidationError naming each bad value."""
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    for secret in ("admin_token", "api_key"):
        if secret in given:
            given[secret] = SecretStr(given[secret])
    return Settings(**given)


def _serve(args: argparse.Namespace) -> int:
    """Load the model here (so a bad model path is a one-line error, exit 2), serve HTTP on a thread of its own (two
    listeners with ``--admin-port``) and run the engine loop on this, the main thread, where GNU OpenMP's parallel
    regions are cheapest (:mod:`server.engine`).

    Shutdown: the first SIGTERM or SIGINT starts a drain (:meth:`server.app.AppState.drain`: ``/ready`` 503, new
    requests 503, running ones get ``--drain-timeout`` seconds and are then ended with finish reason "shutdown"),
    after which uvicorn closes the listeners (waiting up to :data:`FLUSH_SECONDS` for the last responses to be
    written) and the lifespan stops the engine. A second signal stops at once. Returns 0 after a clean shutdown,
    1 when the server never started (a port in use) or the engine loop died."""
    import signal
    import threading

    import uvicorn

    from server.app import create_app
    from server.host import tune_malloc
    from server.model_loader import load_model

    settings = settings_from_args(args)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loaded = load_model(settings.model, cache_dir=settings.cache_dir, device=settings.device, dtype=settings.dtype)
    if loaded.device.type == "cpu":
        tune_malloc()
    app = create_app(settings, loaded=loaded, engine_on_caller=True)
    state = app.state.sp
    servers = [uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                                             timeout_graceful_shutdown=FLUSH_SECONDS))]
    if settings.admin_port is not None:  # the lifespan runs once, with the main listener
        servers.append(uvicorn.Server(uvicorn.Config(
            app, host=settings.admin_host or settings.host, port=settings.admin_port, log_level=settings.log_level,
            lifespan="off", timeout_graceful_shutdown=FLUSH_SECONDS)))
    threads = [threading.Thread(target=srv.run, name=f"http-{i}", daemon=True) for i, srv in enumerate(servers)]

    def exit_all(force: bool = False) -> None:
        for srv in servers:
            srv.should_exit = True
            srv.force_exit = srv.force_exit or force

    def drain_then_exit() -> None:
        state.drain(settings.drain_timeout)
        exit_all()

    def on_signal(signum, frame) -> None:
        if state.draining:  # a second signal: stop now
            logging.getLogger(__name__).warning("second signal %d: stopping without waiting", signum)
            exit_all(force=True)
            return
        logging.getLogger(__name__).info("signal %d: draining for up to %.1f s", signum, settings.drain_timeout)
        state.draining = True  # /ready 503 from this instant, before the drain thread runs
        threading.Thread(target=drain_then_exit, name="drain", daemon=True).start()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    for t in threads:
        t.start()
    # every listener bound and the start-up done; a listener that could not bind ends its thread
    while not (state.ready and state.engine is not None and all(srv.started for srv in servers)):
        if not all(t.is_alive() for t in threads):
            exit_all()
            break
        threads[0].join(0.2)
    engine = state.engine
    if engine is None or not state.ready:  # the start-up failed (e.g. the prompt store is unreachable) or a
        if engine is not None:             # listener could not bind: exit 1 at once rather than run a loop
            engine.stop()                  # nobody can reach
        exit_all()
        for t in threads:
            t.join()
        return 1
    engine.run_forever()  # returns once the lifespan's shutdown stopped the engine, or the loop died
    if engine.error is not None:
        exit_all()  # a dead engine takes the HTTP server down with it
    for t in threads:
        t.join()
    return 0 if all(srv.started for srv in servers) and engine.error is None else 1


def _prepare_model(args: argparse.Namespace) -> int:
    """Convert (once) and load the model, so the first ``serve`` starts in seconds."""
    from server.model_loader import load_model

    settings = settings_from_args(args)
    loaded = load_model(settings.model, cache_dir=settings.cache_dir, device="cpu", dtype="float32")
    print(f"model {loaded.model_id}: hidden_size {loaded.hidden_size}, context {loaded.max_context} tokens")
    return 0


def _upload(args: argparse.Namespace) -> int:
    """Upload a prompt file or PEFT adapter directory through the admin API."""

    import httpx

    from server.client import SoftpromptClient, SoftpromptError

    token = args.admin_token
    if token is None:  # the environment is read by Settings only
        from server.config import Settings

        configured = Settings().admin_token
        token = configured.get_secret_value() if configured else None
    try:
        with SoftpromptClient(args.server, admin_token=token) as client:
            meta = client.upload(args.task, args.path)
    except (SoftpromptError, OSError, httpx.HTTPError) as exc:
        print(f"softprompt upload: {exc}", file=sys.stderr)
        return 1
    print(f"{meta['task']}: {meta['action']}, version {meta['version']}, {meta['num_virtual_tokens']} virtual tokens")
    return 0


def _clean_errors(command: str, func):
    """``func`` with bad settings or a bad model path reported as one line on stderr and exit status 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except Exception as exc:  # noqa: BLE001 - a clean one-line error for bad settings or a bad model path
            from pydantic import ValidationError

            from server.model_loader import ModelLoadError

            if isinstance(exc, ValidationError | ModelLoadError):
                print(f"softprompt {command}: {exc}", file=sys.stderr)
                return 2
            raise

    return run


def register(sub) -> None:
    """Add ``serve``, ``prepare-model`` and ``upload`` to the root command's subparsers."""
    serve = sub.add_parser("serve", help="run the HTTP server")
    _add_settings_flags(serve)
    serve.set_defaults(func=_clean_errors("serve", _serve))
    prep = sub.add_parser("prepare-model", help="convert the model once into the safetensors cache")
    _add_settings_flags(prep)
    prep.set_defaults(func=_clean_errors("prepare-model", _prepare_model))
    up = sub.add_parser("upload", help="upload a soft prompt to a running server (admin API)")
    up.add_argument("path", help=".safetensors file, .zip/.tar.gz of a PEFT adapter, or a PEFT adapter directory")
    up.add_argument("--task", required=True)
    up.add_argument("--server", default="http://127.0.0.1:8000")
    up.add_argument("--admin-token", default=None, help="default: $SOFTPROMPT_ADMIN_TOKEN")
    up.set_defaults(func=_clean_errors("upload", _upload))
