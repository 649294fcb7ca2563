"""``softprompt bench``: registered with the root command (:mod:`softprompt_cli`); :mod:`bench.serve_bench`
(which imports torch) parses its own flags and is imported only when the subcommand runs."""

from __future__ import annotations


def _bench(argv: list[str]) -> int:
    from bench.serve_bench import main

    return main(argv)


def register(sub) -> None:
    """Add ``bench`` to the root command's subparsers."""
    sub.add_parser("bench", help="benchmark a live server over HTTP against a sequential baseline",
                   add_help=False).set_defaults(argv_func=_bench)
