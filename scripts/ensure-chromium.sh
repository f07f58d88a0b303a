#!/usr/bin/env bash
# Make sure a headless-capable Chromium is installed: the dashboard test
# (tests/it/dashboard.rs) loads the page in it.
#
# - Already installed (/usr/bin/chromium, or TIDEMARK_CHROMIUM pointing at a
#   browser binary): print one line, exit 0.
# - Missing on Debian/Ubuntu: install the `chromium` apt package (uses sudo
#   when not root).
# - Missing elsewhere: print what to install and exit 1.
set -euo pipefail

CHROMIUM=${TIDEMARK_CHROMIUM:-/usr/bin/chromium}

log() { printf 'ensure-chromium: %s\n' "$*" >&2; }

# shellcheck source=scripts/lib-apt.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib-apt.sh"

have_chromium() {
  [[ -x "$CHROMIUM" ]]
}

report_and_exit() {
  local version
  version=$("$CHROMIUM" --version 2>/dev/null | head -n 1 || true)
  echo "ensure-chromium: ${version:-chromium} OK ($CHROMIUM)"
  exit 0
}

print_manual_instructions() {
  log "$CHROMIUM not found. The dashboard test needs Chromium (headless). Install it:"
  case "$(uname -s)" in
    Darwin)
      log "  macOS:   brew install --cask chromium, then TIDEMARK_CHROMIUM=/Applications/Chromium.app/Contents/MacOS/Chromium" ;;
    *)
      log "  Debian:         sudo apt-get install chromium"
      log "  Ubuntu:         Google Chrome's .deb (google-chrome-stable) or Chromium from a non-snap source"
      log "  Fedora/RHEL:    sudo dnf install chromium"
      log "  Arch:           sudo pacman -S chromium" ;;
  esac
  log "and, if it is not at /usr/bin/chromium, point TIDEMARK_CHROMIUM at the binary; then re-run."
}

if have_chromium; then
  report_and_exit
fi

if [[ -n "${TIDEMARK_CHROMIUM:-}" ]]; then
  log "TIDEMARK_CHROMIUM=$TIDEMARK_CHROMIUM is not an executable file"
  exit 1
fi

if ! have_apt; then
  print_manual_instructions
  exit 1
fi

log "installing chromium with apt-get ($CHROMIUM not found)"
# Debian ships a real `chromium` package. Ubuntu only has `chromium-browser`,
# a wrapper that installs a snap (no good in containers): there this fails
# and the instructions below say how to point at another browser binary.
if ! apt_install chromium; then
  log "installing chromium failed"
  print_manual_instructions
  exit 1
fi

if ! have_chromium; then
  log "$CHROMIUM still missing after installing the chromium package"
  print_manual_instructions
  exit 1
fi
report_and_exit
