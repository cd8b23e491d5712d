#!/usr/bin/env bash
# Installs Debian's chromium and chromium-driver: the headless browser tests/ui drives (through Selenium)
# to check that the report artifacts render in the Prefect UI itself, tables and inlined plots.
#
#     bash scripts/setup_browser.sh           # instant when /usr/bin/chromium and chromedriver exist
#
# Selenium's and Playwright's own browser downloads cannot work on machines with only package
# registries (../shared/ENV.md): the test uses these two executables by path. Needs root (or sudo) and
# apt's network the first time.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
start=$SECONDS
fail() {
    echo "setup_browser: $1; install Debian's chromium and chromium-driver by hand" \
        "(apt-get install chromium chromium-driver), or the UI tests cannot run" >&2
    exit 1
}
if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    fail "not root and no password-less sudo"
fi
command -v apt-get >/dev/null || fail "no apt-get on this machine"
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! "${as_root[@]}" apt-get update -qq >"$log" 2>&1 ||
    ! "${as_root[@]}" apt-get install -y -qq --no-install-recommends chromium chromium-driver >>"$log" 2>&1; then
    tail -n 20 "$log" >&2
    fail "apt-get could not install chromium and chromium-driver"
fi
[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] ||
    fail "apt-get finished but /usr/bin/chromium or /usr/bin/chromedriver is missing"
echo "setup_browser: $(/usr/bin/chromium --version 2>/dev/null | head -1) ready in $((SECONDS - start)) s"
