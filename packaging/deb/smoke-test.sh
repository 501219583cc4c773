#!/usr/bin/env bash
# Installs a pyipcd .deb, then uses it as systemd would: `pyipcd check` and
# `pyipcd run` on the installed /etc/pyipcd/pyipcd.toml with an empty
# environment and systemd's default PATH, as an unprivileged user (the unit
# uses DynamicUser=); a line sent to the default echo role must come back and
# /health must answer. Then purges the package again. Needs root (dpkg).
# Usage: packaging/deb/smoke-test.sh target/deb/debian/pyipcd_*.deb
set -euo pipefail
deb=${1:?usage: $0 path/to/pyipcd.deb}
systemd_path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
as_unit() { env -i PATH="$systemd_path" setpriv --reuid=65534 --regid=65534 --clear-groups "$@"; }

pid=
log=$(mktemp)
cleanup() {
  status=$?
  [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null
  if [ "$status" -ne 0 ] && [ -s "$log" ]; then echo "-- daemon log:"; cat "$log"; fi
  rm -f "$log"
  dpkg --purge pyipcd >/dev/null 2>&1 || true
}
trap cleanup EXIT
dpkg -i "$deb"
dpkg -L pyipcd | grep -qx /usr/bin/pyipcd
dpkg -L pyipcd | grep -qx /usr/lib/systemd/system/pyipcd.service
grep -qx /etc/pyipcd/pyipcd.toml /var/lib/dpkg/info/pyipcd.conffiles

echo "-- pyipcd check (empty environment, systemd PATH, uid 65534)"
as_unit /usr/bin/pyipcd check -c /etc/pyipcd/pyipcd.toml

if command -v systemd-analyze >/dev/null; then
  out=$(systemd-analyze verify /usr/lib/systemd/system/pyipcd.service 2>&1)
  if [ -n "$out" ]; then echo "$out"; exit 1; fi
  echo "-- systemd-analyze verify: installed unit ok"
fi

echo "-- pyipcd run"
# A simple command, so $! is the daemon itself (env and setpriv exec it).
env -i PATH="$systemd_path" setpriv --reuid=65534 --regid=65534 --clear-groups \
  /usr/bin/pyipcd run -c /etc/pyipcd/pyipcd.toml 2>"$log" &
pid=$!
for _ in $(seq 100); do
  as_unit /usr/bin/pyipcd health -c /etc/pyipcd/pyipcd.toml >/dev/null 2>&1 && break
  sleep 0.1
done
as_unit /usr/bin/pyipcd health -c /etc/pyipcd/pyipcd.toml
exec 3<>/dev/tcp/127.0.0.1/50007
printf 'hello from the deb\n' >&3
IFS= read -r -t 10 reply <&3 || true
exec 3<&-
[ "$reply" = "hello from the deb" ] || { echo "echo role answered: '$reply'"; exit 1; }
echo "echo role answered: $reply"
# What the unit's ExecReload runs while the daemon holds its ports.
as_unit /usr/bin/pyipcd check --no-bind -c /etc/pyipcd/pyipcd.toml >/dev/null
if as_unit /usr/bin/pyipcd check -c /etc/pyipcd/pyipcd.toml 2>/dev/null; then
  echo "check did not notice the daemon's ports in use"; exit 1
fi
kill -TERM "$pid"
code=0
wait "$pid" || code=$?
pid=
[ "$code" -eq 0 ] || { echo "pyipcd run exited $code after SIGTERM"; exit 1; }
grep -E 'embedded Python .*executable /usr/bin/python3.*base prefix /usr, venv none' "$log"
trap - EXIT
rm -f "$log"
dpkg --purge pyipcd
[ ! -e /usr/bin/pyipcd ] && [ ! -e /etc/pyipcd/pyipcd.toml ]
echo "-- installed, checked, ran and purged: ok"
