#!/usr/bin/env bash
# Mount SOURCE on MOUNTPOINT with cachefs, setting this machine up first.
#
#   ./mount.sh SOURCE MOUNTPOINT [cachefs mount options]
#
# Set-up (.ci/setup) installs the apt packages it lacks (as root; otherwise
# it prints the command to run) and creates .venv with cachefs installed, or
# updates it; when it has work to do, one line says what.  It is silent and
# quick when everything is in place.  Options: `cachefs mount --help`.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [ "$#" -eq 0 ]; then
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi

# What set-up is about to do, in one line (it works silently, --quiet, and a
# first run takes about a minute); only what mounting needs (--mount-only).
bash "$root/.ci/setup" --mount-only --plan >&2 || true

setup_log="$(mktemp)"
status=0
bash "$root/.ci/setup" --mount-only --quiet >"$setup_log" 2>&1 || status=$?
if [ "$status" != 0 ]; then
    cat "$setup_log" >&2
    rm -f "$setup_log"
    exit "$status"
fi
rm -f "$setup_log"

exec "$root/.venv/bin/cachefs" mount "$@"
