#!/bin/sh
# The container's entry point: `magpie ARGS` (default `run`). Before `run` it brings the database schema up to date
# (`magpie db upgrade`), so a new image on an old volume migrates itself; `exec` then makes magpie the process that
# receives the container's SIGTERM and stops cleanly (SHUTDOWN_GRACE_SECONDS).
set -eu
if [ "$#" -eq 0 ]; then
  set -- run
fi
if [ "$1" = "run" ]; then
  magpie db upgrade --quiet
fi
exec magpie "$@"
