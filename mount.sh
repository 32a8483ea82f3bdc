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

# What .ci/setup is about to do, in one line: it works silently (--quiet),
# and a first run takes about a minute.  These are setup's own checks; a
# step they miss is done all the same, only not announced.
setup_plan() {
    local venv="$root/.venv" pkgs=() steps=() venv_ok=0
    command -v fusermount3 >/dev/null 2>&1 || pkgs+=(fuse3)
    command -v fio >/dev/null 2>&1 || pkgs+=(fio)
    command -v mkfs.ext4 >/dev/null 2>&1 || pkgs+=(e2fsprogs)
    command -v pkg-config >/dev/null 2>&1 || pkgs+=(pkg-config)
    pkg-config --exists fuse3 2>/dev/null || pkgs+=(libfuse3-dev)
    if [ -x "$venv/bin/python" ] &&
        "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then
        venv_ok=1
    elif ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
        pkgs+=(python3-venv)
    fi
    # not root: setup installs nothing, it prints the apt-get command instead
    if [ "${#pkgs[@]}" -gt 0 ] && [ "$(id -u)" != 0 ]; then
        return
    fi
    [ "${#pkgs[@]}" -eq 0 ] || steps+=("installing ${pkgs[*]}")
    if [ "$venv_ok" = 0 ]; then
        steps+=("creating .venv (first run, about a minute)")
    elif [ "$(cat "$venv/.cachefs-install-stamp" 2>/dev/null)" != \
        "$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)" ]; then
        steps+=("updating .venv for the changed pyproject.toml (under a minute)")
    fi
    if [ "${#steps[@]}" -gt 0 ]; then
        local line="${steps[0]}" step
        for step in "${steps[@]:1}"; do line+=", $step"; done
        echo "setting up: $line" >&2
    fi
}
setup_plan

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
