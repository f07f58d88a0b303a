#!/usr/bin/env bash
# Builds the Redis-compatible servers whose source archives are in the
# vendor directory (../shared/vendor, or TIDEMARK_VENDOR_DIR): Redis 7.2.6
# and Valkey 8.0.1 today. Each is built once (the server binary only, with
# TLS, so the TLS tests run against it too, and libc malloc: about half a
# minute each on 2 cores) and kept under target/servers/<name>-tls/ (or
# $CARGO_TARGET_DIR/servers), so later runs reuse it. Prints one "<name>
# <path to the server binary>" line per server on stdout; prints nothing
# when there is no vendor directory (a fresh clone), which is not an error.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
vendor=${TIDEMARK_VENDOR_DIR:-../shared/vendor}
target=${CARGO_TARGET_DIR:-target}
out="$target/servers"

log() { printf 'build-servers: %s\n' "$*" >&2; }

if [[ ! -d $vendor ]]; then
  log "no vendor directory at $vendor: nothing to build"
  exit 0
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)

# A C compiler and make (the Rust toolchain usually brings cc along).
# shellcheck source=scripts/lib-apt.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib-apt.sh"
if ! command -v cc >/dev/null 2>&1 || ! command -v make >/dev/null 2>&1; then
  if have_apt; then
    log "installing build-essential (a C compiler and make) with apt-get"
    apt_install build-essential || { log "could not install build-essential"; exit 1; }
  else
    log "a C compiler (cc) and make are needed to build the vendored servers"
    exit 1
  fi
fi
# OpenSSL's headers, for BUILD_TLS=yes.
if [[ ! -f /usr/include/openssl/ssl.h ]]; then
  if have_apt; then
    log "installing libssl-dev (OpenSSL headers, for the servers' TLS) with apt-get"
    apt_install libssl-dev || { log "could not install libssl-dev"; exit 1; }
  else
    log "OpenSSL's development files (openssl/ssl.h) are needed to build the vendored servers with TLS"
    exit 1
  fi
fi

shopt -s nullglob
for archive in "$vendor"/redis-*.tar.gz "$vendor"/valkey-*.tar.gz; do
  name=$(basename "$archive" .tar.gz)
  case $name in
    redis-*) bin=redis-server ;;
    valkey-*) bin=valkey-server ;;
  esac
  binary="$out/$name-tls/$bin"
  if [[ ! -x $binary ]]; then
    log "building $name with TLS (once; kept in $out/$name-tls)"
    work=$(mktemp -d)
    tar -xzf "$archive" -C "$work"
    if ! make -C "$work/$name/src" -j2 BUILD_TLS=yes MALLOC=libc "$bin" >"$work/build.log" 2>&1; then
      tail -n 40 "$work/build.log" >&2
      log "building $name failed (the log's end is above)"
      rm -rf "$work"
      exit 1
    fi
    mkdir -p "$out/$name-tls"
    cp "$work/$name/src/$bin" "$binary.tmp"
    mv "$binary.tmp" "$binary"
    rm -rf "$work"
  fi
  version=$("$binary" --version | sed -n 's/.*v=\([0-9][0-9.]*\).*/\1/p')
  log "$name: $binary (v=$version)"
  echo "$name $binary"
done
