"""The ``softprompt`` command: ``serve``, ``prepare-model``, ``upload``, ``bench``, ``train`` and ``eval``.

``serve``'s flags are generated from :class:`server.config.Settings`, so each flag has the same name, default and
environment variable (``SOFTPROMPT_<FIELD>``) as its setting; a flag given on the command line wins.
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing

from pydantic import SecretStr

from server.config import Settings


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for name, info in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"SOFTPROMPT_{name.upper()}"
        helptext = f"{info.description or ''} [env {env}]".strip()
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
    if "admin_token" in given:
        given["admin_token"] = SecretStr(given["admin_token"])
    return Settings(**given)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app

    settings = settings_from_args(args)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)
    return 0


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="softprompt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP server")
    _add_settings_flags(serve)
    serve.set_defaults(func=_serve)
    prep = sub.add_parser("prepare-model", help="convert the model once into the safetensors cache")
    _add_settings_flags(prep)
    prep.set_defaults(func=_prepare_model)
    up = sub.add_parser("upload", help="upload a soft prompt to a running server (admin API)")
    up.add_argument("path", help=".safetensors file, .zip/.tar.gz of a PEFT adapter, or a PEFT adapter directory")
    up.add_argument("--task", required=True)
    up.add_argument("--server", default="http://127.0.0.1:8000")
    up.add_argument("--admin-token", default=None, help="default: $SOFTPROMPT_ADMIN_TOKEN")
    up.set_defaults(func=_upload)
    bench = sub.add_parser("bench", help="benchmark a live server over HTTP against a sequential baseline",
                           add_help=False)
    bench.set_defaults(func=None)
    # train / eval parse their own flags (training.cli); the package is imported only when they run.
    sub.add_parser("train", help="train a soft prompt on the frozen base model (PEFT adapter directory)",
                   add_help=False).set_defaults(func=None)
    sub.add_parser("eval", help="compare base model, instruction and soft prompt on held-out data",
                   add_help=False).set_defaults(func=None)
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from bench.serve_bench import main as bench_main

        return bench_main(rest)
    if args.command in ("train", "eval"):
        from training.cli import eval_main, train_main

        return (train_main if args.command == "train" else eval_main)(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except Exception as exc:  # noqa: BLE001 - a clean one-line error for bad settings or a bad model path
        from pydantic import ValidationError

        from server.model_loader import ModelLoadError

        if isinstance(exc, ValidationError | ModelLoadError):
            print(f"softprompt {args.command}: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
