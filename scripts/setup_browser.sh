#!/usr/bin/env bash
# Installs Debian's Chromium for the app's browser tests when it is missing
# (Playwright's own browser download is not used: the tests drive /usr/bin/chromium).
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
echo "setup: /usr/bin/chromium missing, installing Debian's chromium package for the browser tests"
SUDO=""
if [ "$(id -u)" != 0 ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
echo "setup: installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
