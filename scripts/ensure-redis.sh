#!/usr/bin/env bash
# Make sure redis-server and redis-cli (Redis >= 6.2) are on PATH.
#
# - Already installed and recent enough: print one line, exit 0.
# - Missing on Debian/Ubuntu: install the `redis-server` apt package
#   (uses sudo when not root). The package may also start a system Redis on
#   port 6379; tidemark's scripts never use it, so that is harmless.
# - Missing elsewhere: print what to install and exit 1.
set -euo pipefail

MIN_MAJOR=6
MIN_MINOR=2

log() { printf 'ensure-redis: %s\n' "$*" >&2; }

# shellcheck source=scripts/lib-apt.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib-apt.sh"

# Prints the redis-server version (e.g. 7.0.15), or nothing.
server_version() {
  redis-server --version 2>/dev/null | sed -n 's/.*v=\([0-9][0-9.]*\).*/\1/p' | head -n 1
}

have_redis() {
  command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1
}

# Exit 0 (with one line of output) when the installed Redis is recent enough,
# exit 1 with an explanation when it is too old.
check_version_and_exit() {
  local version major minor
  version=$(server_version)
  if [[ -z "$version" ]]; then
    log "could not determine the version of $(command -v redis-server) ('redis-server --version' gave no v=X.Y.Z)"
    exit 1
  fi
  IFS=. read -r major minor _ <<<"$version"
  if (( major > MIN_MAJOR || (major == MIN_MAJOR && ${minor:-0} >= MIN_MINOR) )); then
    echo "ensure-redis: redis-server $version OK ($(command -v redis-server))"
    exit 0
  fi
  log "redis-server $version at $(command -v redis-server) is too old: tidemark needs Redis >= $MIN_MAJOR.$MIN_MINOR"
  log "upgrade it (Debian/Ubuntu: the packages.redis.io apt repository, see https://redis.io/docs/latest/operate/oss_and_stack/install/; macOS: brew upgrade redis)"
  log "or put a newer redis-server/redis-cli first on PATH"
  exit 1
}

print_manual_instructions() {
  log "redis-server and/or redis-cli (Redis >= $MIN_MAJOR.$MIN_MINOR) not found on PATH. Install Redis:"
  case "$(uname -s)" in
    Darwin)
      log "  macOS:   brew install redis" ;;
    *)
      if [[ -f /etc/fedora-release || -f /etc/redhat-release ]] || command -v dnf >/dev/null 2>&1; then
        log "  Fedora/RHEL:  sudo dnf install redis"
      elif [[ -f /etc/arch-release ]] || command -v pacman >/dev/null 2>&1; then
        log "  Arch:    sudo pacman -S redis"
      else
        log "  macOS:   brew install redis"
        log "  Fedora:  sudo dnf install redis"
        log "  Arch:    sudo pacman -S redis"
      fi ;;
  esac
  log "  or build from source (Redis >= $MIN_MAJOR.$MIN_MINOR): https://redis.io/docs/latest/operate/oss_and_stack/install/build-stack/"
  log "then make sure redis-server and redis-cli are on PATH and re-run."
}

if have_redis; then
  check_version_and_exit
fi

if ! have_apt; then
  print_manual_instructions
  exit 1
fi

log "installing redis-server with apt-get (Redis not found on PATH)"
if ! apt_install redis-server; then
  # In containers without an init system the package's post-install step may
  # fail to start the (unused) system Redis; that is fine as long as the
  # binaries were installed.
  if have_redis; then
    log "apt-get reported an error (probably starting the system redis service); the binaries are installed, continuing"
  else
    log "installing redis-server failed"
    exit 1
  fi
fi

if ! have_redis; then
  log "redis-server/redis-cli still not on PATH after installing the redis-server package"
  exit 1
fi
check_version_and_exit
