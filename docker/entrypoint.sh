#!/bin/sh
# Serve on all interfaces inside the container; extra arguments go to `softprompt serve`.
# Set SOFTPROMPT_ADMIN_TOKEN to enable the admin API.
exec softprompt serve --host 0.0.0.0 --port "${PORT:-8000}" "$@"
