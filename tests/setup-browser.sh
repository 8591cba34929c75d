#!/bin/sh
# What the browser test needs beyond pip: Debian's chromium package (Playwright drives it; no browser
# download). Installed with apt-get when no chromium is on the PATH (through sudo when not root); a
# chromium already there, or one named by LATENTFORGE_CHROMIUM, is used as it is.
set -eu
if [ -n "${LATENTFORGE_CHROMIUM:-}" ] || command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "tests/setup-browser.sh: no apt-get here; install Chromium yourself and set LATENTFORGE_CHROMIUM to its path" >&2
    exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
echo "tests/setup-browser.sh: installing Debian's chromium package for the browser test (apt-get install chromium)"
$sudo apt-get update -qq
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
