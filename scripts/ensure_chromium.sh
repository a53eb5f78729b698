#!/usr/bin/env bash
# Make /usr/bin/chromium available for the MLflow UI browser check (tests/test_mlflow_server.py).
#
# Installs Debian's `chromium` package with apt-get when it is missing and we are root. Idempotent
# (does nothing when chromium is there) and quiet (apt's output goes to a log, shown only on failure).
# Does not stop `make test` itself: when it cannot install, it says why on stderr and exits 0, and the browser
# test fails, naming the missing binary (WEAKSEG_SKIP_BROWSER=1 skips it instead).
set -u

CHROMIUM=/usr/bin/chromium
say() { echo "ensure_chromium: $*" >&2; }

if [ -x "$CHROMIUM" ]; then
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    say "$CHROMIUM is missing and this is not root: not installing (the browser test will fail unless WEAKSEG_SKIP_BROWSER=1)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    say "$CHROMIUM is missing and there is no apt-get here: not installing (the browser test will fail unless WEAKSEG_SKIP_BROWSER=1)"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
log=$(mktemp /tmp/ensure_chromium.XXXXXX.log)
packages=(chromium fonts-dejavu-core)
install() { apt-get install -y -q --no-install-recommends "${packages[@]}" >>"$log" 2>&1; }

say "installing ${packages[*]} with apt-get (log: $log)"
# The package lists may be stale or absent (fresh containers): update once, only when the first try fails.
if ! install; then
    if ! { apt-get update -q >>"$log" 2>&1 && install; }; then
        say "apt-get could not install chromium; the browser test will fail unless WEAKSEG_SKIP_BROWSER=1. Last lines of $log:"
        tail -n 5 "$log" >&2
        exit 0
    fi
fi
if [ -x "$CHROMIUM" ]; then
    say "installed $("$CHROMIUM" --version 2>/dev/null || echo chromium)"
    rm -f "$log"
else
    say "apt-get finished but $CHROMIUM is still missing; the browser test will fail unless WEAKSEG_SKIP_BROWSER=1 (log: $log)"
fi
exit 0
