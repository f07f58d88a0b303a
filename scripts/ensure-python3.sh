#!/usr/bin/env bash
# Make sure python3 is on PATH: the tests run the README's consumer example
# (examples/remind.py) through `tidemark consume`.
#
# - Already installed: print one line, exit 0.
# - Missing on Debian/Ubuntu: install the `python3` apt package (uses sudo
#   when not root).
# - Missing elsewhere: print what to install and exit 1.
set -euo pipefail

log() { printf 'ensure-python3: %s\n' "$*" >&2; }

# shellcheck source=scripts/lib-apt.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib-apt.sh"

have_python3() {
  command -v python3 >/dev/null 2>&1
}

report_and_exit() {
  echo "ensure-python3: $(python3 --version 2>&1) OK ($(command -v python3))"
  exit 0
}

if have_python3; then
  report_and_exit
fi

if ! have_apt; then
  log "python3 not found on PATH. The README's consumer example is a Python script: install Python 3"
  log "(macOS: brew install python; Fedora: sudo dnf install python3; Arch: sudo pacman -S python) and re-run."
  exit 1
fi

log "installing python3 with apt-get (python3 not found)"
if ! apt_install python3 || ! have_python3; then
  log "installing python3 failed"
  exit 1
fi
report_and_exit
