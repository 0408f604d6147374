#!/bin/sh
# Unpacks Debian's haproxy into DEST (default .venv/opt/haproxy) so that tests/unit/test_deploy.py
# can run `haproxy -c` on deploy/haproxy.cfg. `make setup` calls it.
# Why not `apt-get install haproxy`: that needs root and starts a daemon. `apt-get download` +
# `dpkg-deb -x` install nothing, run no maintainer script; of the libraries haproxy links, only
# those this machine lacks are unpacked beside it (DEST/lib), a few hundred KiB. Without apt it does nothing: the
# test then checks the config field by field only.
set -eu
dest=${1:-.venv/opt/haproxy}
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || { echo "haproxy-checker: no apt-get/dpkg-deb here; skipped"; exit 0; }
[ -x "$dest/haproxy" ] && exit 0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
# apt-get download as root warns that its sandbox user cannot write here: not an error.
apt-get download -qq haproxy 2>/dev/null || { echo "haproxy-checker: apt-get download haproxy failed (apt-get update?); skipped"; exit 0; }
# The libraries it links that this machine has not installed, and theirs (two levels cover
# Debian's: the Lua and OpenTracing ones).
absent() { for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || echo "$pkg"; done; }
deps() { for pkg in "$@"; do apt-cache depends "$pkg" | awk '/^ *Depends: lib/ {print $2}'; done | sort -u; }
libs=$(absent $(deps haproxy))
more=$(absent $(deps $libs))
# shellcheck disable=SC2086
[ -z "$libs$more" ] || apt-get download -qq $libs $more 2>/dev/null || true
mkdir -p root
for deb in *.deb; do dpkg-deb -x "$deb" root; done
mkdir -p "$dest/lib"
cp root/usr/sbin/haproxy "$dest/haproxy"
# Only what the system lacks: the system's own libc, libssl... stay the ones in use.
missing() { ldd "$1" | awk '/not found/ {print $1}'; }
for round in 1 2 3; do
  for name in $(LD_LIBRARY_PATH="$dest/lib" missing "$dest/haproxy"); do
    found=$(find root -name "$name" | head -1)
    [ -n "$found" ] && cp -L "$found" "$dest/lib/"
  done
done
if LD_LIBRARY_PATH="$dest/lib" "$dest/haproxy" -v >/dev/null 2>&1; then
  echo "haproxy-checker: $(LD_LIBRARY_PATH="$dest/lib" "$dest/haproxy" -v | head -1) in $dest"
else
  echo "haproxy-checker: the unpacked haproxy does not run here; removed (the test checks fields only)"
  rm -rf "$dest"
fi
