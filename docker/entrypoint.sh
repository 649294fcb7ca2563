#!/bin/sh
# The image's entrypoint: `softprompt serve` with the container's arguments appended.
#
#   docker run IMAGE                          softprompt serve                 (settings from SOFTPROMPT_* variables)
#   docker run IMAGE --log-level debug        softprompt serve --log-level debug   (a flag wins over the environment)
#   docker run IMAGE train --data ...         softprompt train --data ...      (any other softprompt subcommand)
#   docker run IMAGE python -c ...            that command as is
#
# The image sets SOFTPROMPT_HOST=0.0.0.0, SOFTPROMPT_PORT=8000 and SOFTPROMPT_PROMPTS=/prompts; set
# SOFTPROMPT_ADMIN_TOKEN to turn the admin API on. exec: the server is PID 1 and gets SIGTERM itself (it drains).
set -eu

case "${1:-}" in
    "" | -*)
        exec softprompt serve "$@" ;;
    serve | prepare-model | upload | bench | train | eval | eval-report)
        exec softprompt "$@" ;;
    *)
        exec "$@" ;;
esac
