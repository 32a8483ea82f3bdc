#!/usr/bin/env bash
# Mount SOURCE on MOUNTPOINT with cachefs, setting this machine up first.
#
#   ./mount.sh SOURCE MOUNTPOINT [cachefs mount options]
#
# Set-up (.ci/setup) installs fuse3 and fio with apt-get when missing (as
# root; otherwise it prints the command to run), creates .venv
# and installs cachefs into it when missing or outdated.  It is quiet and quick
# when everything is in place.  Options: see `./mount.sh --help`.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [ "$#" -eq 0 ]; then
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi

setup_log="$(mktemp)"
status=0
bash "$root/.ci/setup" --quiet >"$setup_log" 2>&1 || status=$?
if [ "$status" != 0 ]; then
    cat "$setup_log" >&2
    rm -f "$setup_log"
    exit "$status"
fi
rm -f "$setup_log"

exec "$root/.venv/bin/cachefs" mount "$@"
