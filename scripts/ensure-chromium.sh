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

if [[ ! -f /etc/debian_version ]] && ! command -v apt-get >/dev/null 2>&1; then
  print_manual_instructions
  exit 1
fi

# Debian/Ubuntu: install with apt-get.
SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then
  if ! command -v sudo >/dev/null 2>&1; then
    log "not root and sudo is not available; as root run:"
    log "  apt-get update && apt-get install -y chromium"
    exit 1
  fi
  # Prompt for a password only when someone can answer.
  if [[ -t 0 ]]; then SUDO=(sudo); else SUDO=(sudo -n); fi
fi

log "installing chromium with apt-get ($CHROMIUM not found)"
apt_get() {
  ${SUDO[@]+"${SUDO[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get "$@" </dev/null
}
apt_get update -q >&2
# Debian ships a real `chromium` package. Ubuntu only has `chromium-browser`,
# a wrapper that installs a snap (no good in containers): there this fails
# and the instructions below say how to point at another browser binary.
if ! apt_get install -y -q --no-install-recommends chromium >&2; then
  log "apt-get install chromium failed"
  print_manual_instructions
  exit 1
fi

if ! have_chromium; then
  log "$CHROMIUM still missing after installing the chromium package"
  print_manual_instructions
  exit 1
fi
report_and_exit
