# shellcheck shell=bash
# Sourced by scripts/ensure-*.sh: installing a Debian/Ubuntu package.
# The caller defines log() (messages to stderr).

# True on Debian/Ubuntu (apt-get available).
have_apt() {
  [[ -f /etc/debian_version ]] || command -v apt-get >/dev/null 2>&1
}

# apt_install PACKAGE: `apt-get update` then installs PACKAGE without
# recommends, non-interactively; through sudo when not root (asking for a
# password only when a terminal can answer). Returns non-zero on failure,
# having said why.
apt_install() {
  local package=$1
  local sudo=()
  if [[ "$(id -u)" -ne 0 ]]; then
    if ! command -v sudo >/dev/null 2>&1; then
      log "not root and sudo is not available; as root run:"
      log "  apt-get update && apt-get install -y $package"
      return 1
    fi
    if [[ -t 0 ]]; then sudo=(sudo); else sudo=(sudo -n); fi
  fi
  local apt=(${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get)
  if ! "${apt[@]}" update -q </dev/null >&2; then
    log "apt-get update failed"
    return 1
  fi
  "${apt[@]}" install -y -q --no-install-recommends "$package" </dev/null >&2
}
