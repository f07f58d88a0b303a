#!/usr/bin/env bash
# Make sure Prometheus and promtool are installed: the alert tests
# (tests/it/alerts.rs) check deploy/prometheus/alerts.yml with
# `promtool check rules` and `promtool test rules`, and run a real
# Prometheus against a real daemon.
#
# - Already installed (`prometheus` and `promtool` on PATH, or
#   TIDEMARK_PROMETHEUS / TIDEMARK_PROMTOOL pointing at the binaries):
#   print one line, exit 0.
# - Missing on Debian/Ubuntu: install the `prometheus` apt package (it ships
#   both; uses sudo when not root). The package may also try to start a
#   system Prometheus on port 9090; the tests never use it, so that is
#   harmless.
# - Missing elsewhere: print what to install and exit 1.
set -euo pipefail

PROMETHEUS=${TIDEMARK_PROMETHEUS:-prometheus}
PROMTOOL=${TIDEMARK_PROMTOOL:-promtool}

log() { printf 'ensure-prometheus: %s\n' "$*" >&2; }

# shellcheck source=scripts/lib-apt.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib-apt.sh"

have_prometheus() {
  command -v "$PROMETHEUS" >/dev/null 2>&1 && command -v "$PROMTOOL" >/dev/null 2>&1
}

report_and_exit() {
  local version
  version=$("$PROMETHEUS" --version 2>&1 | head -n 1 || true)
  echo "ensure-prometheus: ${version:-prometheus} OK ($(command -v "$PROMETHEUS"), $(command -v "$PROMTOOL"))"
  exit 0
}

print_manual_instructions() {
  log "prometheus and/or promtool not found. The alert tests need both. Install Prometheus:"
  case "$(uname -s)" in
    Darwin)
      log "  macOS:   brew install prometheus" ;;
    *)
      log "  Debian/Ubuntu:  sudo apt-get install prometheus"
      log "  Fedora/RHEL:    sudo dnf install golang-github-prometheus"
      log "  Arch:           sudo pacman -S prometheus"
      log "  elsewhere:      a release tarball from https://prometheus.io/download/" ;;
  esac
  log "and put prometheus and promtool on PATH (or point TIDEMARK_PROMETHEUS and TIDEMARK_PROMTOOL at them); then re-run."
}

if have_prometheus; then
  report_and_exit
fi

if [[ -n "${TIDEMARK_PROMETHEUS:-}${TIDEMARK_PROMTOOL:-}" ]]; then
  log "TIDEMARK_PROMETHEUS=${TIDEMARK_PROMETHEUS:-} / TIDEMARK_PROMTOOL=${TIDEMARK_PROMTOOL:-}: not both executable"
  exit 1
fi

if ! have_apt; then
  print_manual_instructions
  exit 1
fi

log "installing prometheus with apt-get (prometheus or promtool not found)"
if ! apt_install prometheus; then
  # Without an init system the package's post-install step may fail to
  # start the (unused) system service; fine as long as the binaries exist.
  if have_prometheus; then
    log "apt-get reported an error (probably starting the system prometheus service); the binaries are installed, continuing"
  else
    log "installing prometheus failed"
    print_manual_instructions
    exit 1
  fi
fi

if ! have_prometheus; then
  log "prometheus/promtool still missing after installing the prometheus package"
  print_manual_instructions
  exit 1
fi
report_and_exit
